"""Everything that talks to Redis: key names, Lua scripts and the async store."""
