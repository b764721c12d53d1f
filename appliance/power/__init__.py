"""Power sensing for the power-aware scheduler: UPS via NUT, the OS battery, and box power meters.

Sources (`NutPowerSource`, `BatteryPowerSource`) answer "what is the supply doing?" as a
`PowerReading`; meters (`detect_meter`) answer "what does this box draw?" as a `MeterSample`.
Neither ever raises from its polling call: the gate decides what an unknown reading means.
"""

from edgescreen.appliance.power.battery import BatteryPowerSource
from edgescreen.appliance.power.meters import (
    EstimatedMeter,
    Ina3221Meter,
    MeterSample,
    MeterUnavailable,
    PowerMeter,
    RaplMeter,
    detect_meter,
)
from edgescreen.appliance.power.nut import NutClient, NutError, NutPowerSource, NutUnavailable
from edgescreen.appliance.power.sources import PowerReading, PowerSource, parse_status

__all__ = [
    "BatteryPowerSource",
    "EstimatedMeter",
    "Ina3221Meter",
    "MeterSample",
    "MeterUnavailable",
    "NutClient",
    "NutError",
    "NutPowerSource",
    "NutUnavailable",
    "PowerMeter",
    "PowerReading",
    "PowerSource",
    "RaplMeter",
    "detect_meter",
    "parse_status",
]
