"""The live page at `/` and the server-sent events behind it (`/v1/energy/events`)."""
