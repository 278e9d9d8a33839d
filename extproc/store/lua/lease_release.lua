--[[ lease_release.lua: give a lease up, only if this holder still owns it.

KEYS
  1  lease key   (string: holder id, with a TTL)
ARGV
  1  holder id
Reply
  1 released, 0 it was not ours (nothing deleted)
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
