"""The users service of the RideShare tenant: `python -m users`."""
