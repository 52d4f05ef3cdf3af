"""The sans-I/O core: engines, tables and plans that take bytes, events and the time and
return outputs and timers. Nothing here does I/O (ruff bans the imports)."""
