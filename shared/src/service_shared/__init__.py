"""Code shared by the media services: message contracts, settings base and logging setup."""
