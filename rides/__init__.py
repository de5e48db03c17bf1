"""The rides service of the RideShare tenant: `python -m rides`."""
