--[[ first_seen.lua: when each ingested event that carries no `event_timestamp` of its own was
first received. The ingest API plans such an event at that time, so a retry of it (the same
request id, derived from the same body) lands in the same settled set as the first attempt and
is recorded once, however late within the TTL it comes (docs/payi.md).

KEYS
  1 .. N  first-seen record of each event   (string, unix ms; KeySchema.ingest_seen)
ARGV
  1  now, unix ms
  2  TTL of a new record, ms
Reply
  per key, the time it was first seen, unix ms (ARGV 1 when this call created it)
]]
local out = {}
for i, key in ipairs(KEYS) do
  -- SET NX then GET, not SET NX GET: that form needs Redis 7.
  if redis.call('SET', key, ARGV[1], 'NX', 'PX', ARGV[2]) then
    out[i] = tonumber(ARGV[1])
  else
    out[i] = tonumber(redis.call('GET', key)) or tonumber(ARGV[1])
  end
end
return out
