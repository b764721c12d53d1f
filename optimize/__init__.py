"""The optimiser: quantise, compile, validate and benchmark models for one box, into a signed bundle.

Runs at provisioning time on the target itself (an INT8 IR or a TensorRT engine is tuned to the CPU or
GPU it was built on). It uses the appliance's runtime backends to validate and time what it builds,
so a candidate is judged by exactly the code that will run it; the appliance never imports this
package (see appliance.cli.optimize_cmd and appliance.bundle).

Modules: calibration (phantom cases), candidates (what to build), quantize_ort / openvino_build /
tensorrt_build (how), gate (accuracy), benchmark (speed, memory, energy), run (the loop), bundle
(write + sign), report (tables), cli (the command).
"""
