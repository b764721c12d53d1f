"""The DICOM network edge: what comes in from scanners and what goes out to the PACS.

scp.py (the service: AE, threads, start-up recovery, clean stop), handlers.py (association policy,
C-ECHO, the C-STORE receive path), header.py (reading only the header elements we file by, and the
rules an instance must pass), assembly.py (series completion, pipeline selection, series consistency),
quarantine.py (keeping what we refuse, with why), mpps.py (MPPS SCP: scanner busy/idle), export.py
(results to the PACS by C-STORE and STOW-RS through the outbox), fastpath.py (pynetdicom's acceptor
without its polling), sop.py (SOP classes, transfer syntaxes, status codes). No TLS: the appliance
sits on the clinic LAN beside the scanner, as most modalities expect.
"""
