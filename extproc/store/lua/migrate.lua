--[[ migrate.lua: fold one money-layout-1 limit state (micro-dollars) into its layout-2 key
(nano-dollars). Atomic per key; running it again finds nothing to move.

KEYS
  1  layout-1 limit state  (hash: spent, held in micro-dollars; ok, exceeded, overrun, blocked)
  2  layout-2 limit state  (hash: spent, held in nano-dollars; same counts)
ARGV
  1  scale (1000: micro-dollars -> nano-dollars)
Reply
  1 when a key was moved, 0 when there was nothing to move
]]
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local scale = tonumber(ARGV[1])
local old = redis.call('HGETALL', KEYS[1])
for i = 1, #old, 2 do
  local field, value = old[i], tonumber(old[i + 1])
  if value then
    if field == 'spent' or field == 'held' then value = value * scale end
    -- Added, not set: replicas of the new version may already have written to the new key.
    if value ~= 0 then redis.call('HINCRBY', KEYS[2], field, string.format('%d', value)) end
  end
end
-- Keep the longer lifetime of the two (state keys expire some time after their period ends).
local ttl = redis.call('PTTL', KEYS[1])
local current = redis.call('PTTL', KEYS[2])
if ttl > 0 and current > 0 and ttl > current then
  redis.call('PEXPIRE', KEYS[2], ttl)
elseif ttl > 0 and current == -1 and #old > 0 then
  -- The new key was just created by this script (it had no TTL of its own).
  redis.call('PEXPIRE', KEYS[2], ttl)
end
redis.call('DEL', KEYS[1])
return 1
