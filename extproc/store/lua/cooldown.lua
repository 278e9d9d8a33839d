--[[ cooldown.lua: put one upstream credential in cooldown for one model after it failed.

KEYS
  1  cooldown marker of (upstream, credential, model)   (string with a TTL: exists = cooling)
  2  consecutive error count of (upstream, credential)  (integer; deleted by a success)
ARGV
  1  base cooldown ms   2  maximum cooldown ms
  3  Retry-After from the provider, ms (0 when it sent none)
Reply
  { cooldown ms applied, consecutive errors }

Without Retry-After the cooldown doubles with each consecutive error (base, 2x, 4x, ...) up to
the maximum; with it, the provider's word is taken (still capped by the maximum).
]]
local errors = redis.call('INCR', KEYS[2])
redis.call('PEXPIRE', KEYS[2], 3600000)
local base, cap, retry = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local ms
if retry > 0 then
  ms = retry
else
  ms = base * (2 ^ math.min(errors - 1, 10))
end
ms = math.floor(math.min(ms, cap))
if ms > 0 then redis.call('SET', KEYS[1], errors, 'PX', ms) end
return {ms, errors}
