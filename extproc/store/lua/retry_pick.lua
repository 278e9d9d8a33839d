--[[ retry_pick.lua: the credential for the next try of a request whose try failed (a 429,
5xx, reset or connect failure that Envoy retries; extproc/server/retry.py).

KEYS
  1          credentials already tried by this request     (set of candidate numbers, TTL)
  then 3*K   per candidate: cooldown marker, requests window, tokens window (as reserve.lua)
ARGV
  1  the candidate that just failed (1-based)   2  K candidates   3  P of them primaries
  4  now, unix ms   5  bucket width ms   6  buckets per window
  7  tokens estimated for the request (charged to the chosen credential's token window)
  8  TTL of the tried set, ms
  then per candidate (2 each): requests per minute, tokens per minute (0 = no cap)
Reply
  { the chosen candidate (1-based), 0 when every candidate was tried already }

Order: the candidates after the failed one, round robin, primaries before fallbacks; each
skipped while tried, cooling down or at its caps. When every untried one is cooling or full,
the first untried one still goes: the provider's answer (its own error) is then what the
client gets, never a gateway-made one. The chosen credential's windows are charged one
request and the estimate, as the reserve charged the first.
]]
local failed, k, p = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now, width, count = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local tokens, ttl = tonumber(ARGV[7]), tonumber(ARGV[8])
redis.call('SADD', KEYS[1], failed)
redis.call('PEXPIRE', KEYS[1], ttl)
local current = math.floor(now / width)
local function window_sum(key)
  local fields = {}
  for b = current - count, current do fields[#fields + 1] = tostring(b) end
  local total = 0
  for _, v in ipairs(redis.call('HMGET', key, unpack(fields))) do total = total + (tonumber(v) or 0) end
  return total
end
local order = {}
for step = 1, k - 1 do
  local idx = ((failed - 1 + step) % k) + 1
  if idx <= p then order[#order + 1] = idx end
end
for step = 1, k - 1 do
  local idx = ((failed - 1 + step) % k) + 1
  if idx > p then order[#order + 1] = idx end
end
local chosen, spare = 0, 0
for _, idx in ipairs(order) do
  if redis.call('SISMEMBER', KEYS[1], idx) == 0 then
    if spare == 0 then spare = idx end
    local base = 1 + 3 * (idx - 1)
    local rpm, tpm = tonumber(ARGV[8 + 2 * idx - 1]), tonumber(ARGV[8 + 2 * idx])
    if redis.call('EXISTS', KEYS[base + 1]) == 0
        and (rpm == 0 or window_sum(KEYS[base + 2]) + 1 <= rpm)
        and (tpm == 0 or window_sum(KEYS[base + 3]) + tokens <= tpm) then
      chosen = idx
      break
    end
  end
end
if chosen == 0 then chosen = spare end
if chosen > 0 then
  redis.call('SADD', KEYS[1], chosen)
  local base = 1 + 3 * (chosen - 1)
  redis.call('HINCRBY', KEYS[base + 2], tostring(current), 1)
  redis.call('PEXPIRE', KEYS[base + 2], (count + 2) * width)
  if tokens > 0 then
    redis.call('HINCRBY', KEYS[base + 3], tostring(current), string.format('%d', tokens))
    redis.call('PEXPIRE', KEYS[base + 3], (count + 2) * width)
  end
end
return {chosen}
