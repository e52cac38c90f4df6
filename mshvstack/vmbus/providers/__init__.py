"""Synthetic device providers: one small interface, one module per device."""
