"""Power sources: one small interface, one module per kind of sensor."""
