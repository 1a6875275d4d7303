"""HTTP routes, one module per concern; app.main includes their routers."""
