--[[ lease_renew.lua: extend a lease only while this holder still owns it (compare and expire).

KEYS
  1  lease key   (string: holder id, with a TTL)
ARGV
  1  holder id   2  lease time ms
Reply
  1 renewed, 0 the lease belongs to someone else or has expired (the caller has lost it)
]]
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  return 1
end
return 0
