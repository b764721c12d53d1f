"""Training scripts for the reference models (torch; never imported by the appliance)."""
