--[[ settle.lua: record what one request really cost, release what it reserved, and append its
usage event, all at once. Idempotent per request id: a second settle of the same id changes
nothing and replies with settled = 0. Money is integer NANO-dollars (settle layout 3).

Idempotency, without a record per settled request:
  * confirmed (marker TTL 0): the reserve script's reply was seen, so the hold record exists
    until the first settle deletes it. "Hold present" is the marker: nothing is kept after.
  * unconfirmed (marker TTL > 0): no hold is known to exist (no plan, or the reserve timed out
    and may or may not have run). The request id goes into a
    per-time-bucket set that expires as a whole; a hold found anyway (a reserve that ran late)
    is released. The same set entry makes a reserve that arrives after this a no-op.
A cancel (the request was refused while its reserve timed out) only releases: no spend, no
state count, no usage event.

KEYS
  1            settled set of this request's time bucket (set; only written when unconfirmed:
               `settled:` for requests without a plan, `unconfirmed:` for the others)
  2            hold record of this request       (string, JSON; may be absent)
  3            holds index                       (zset)
  4            usage stream                      (stream)
  5 .. 4+L     spend limit state, one per limit  (hash: spent, held, ok, exceeded, overrun, blocked)
  next W       token windows to correct          (hash: bucket number -> tokens)
  next C       concurrency lease sets            (zset)
  next D       keys to delete once settled (e.g. the credential's error count after a success)
ARGV (1: a JSON array holding the positional values below; 2: the usage event bytes, item 5 of
      the array being a placeholder)
  1  request id
  2  now, unix ms
  3  actual cost, nano-dollars
  4  actual tokens (input + output)
  5  usage event (serialized tollgate.v1.UsageEvent)
  6  usage stream max length (approximate trim)
  7  L    8  W    9  C
  10 held estimate, nano-dollars, released if the hold exists
  11 estimated tokens charged to the token windows at reservation
  12 D
  13 settled-set TTL ms (0 = confirmed: the hold record decides)
  14 cancel (1 = release only)
  then per limit  (3 each): max nano-dollars, threshold nano-dollars, state key TTL ms
  then per window (1 each): bucket number charged at reservation
ARGV 3..6, optional (the hourly rollup, extproc/store/rollup.py; absent = no rollup, as
      for calls from before rollups): 3 dimension tuple (JSON), 4 input tokens, 5 output tokens,
      6 rollup TTL ms (0 = none). When present, the LAST key is that hour's rollup hash: a charged
      request adds cost/requests/tokens to fields `c|n|i|o` + tuple there, in this same call.
Reply
  { settled (1 first time, 0 already settled), then per limit: spent, held, state code
    (0 ok, 1 exceeded, 2 overrun) }
]]
local A = cjson.decode(ARGV[1])
-- Numbers go to redis.call as integer strings made here: exact (see reserve.lua) and far
-- cheaper for Redis than converting a Lua number itself.
local fmt = string.format
local function int(x) return fmt('%d', x) end

local rid = A[1]
local actual = tonumber(A[3])
local tokens = tonumber(A[4])
local nl, nw, nc = tonumber(A[7]), tonumber(A[8]), tonumber(A[9])
local estimate = tonumber(A[10])
local est_tokens = tonumber(A[11])
local nd = tonumber(A[12])
local marker_ttl = tonumber(A[13])
local cancel = tonumber(A[14]) == 1
local lbase, wbase = 14, 14 + 3 * nl
local klim, kwin = 4, 4 + nl
local kcon = kwin + nw

-- Validate everything before the first write: a Lua error after a write would leave the
-- settlement half applied (scripts are atomic, not transactional).
local function bad(what) return redis.error_reply('ERR settle.lua: bad ' .. what) end
if not (actual and tokens and nl and nw and nc and estimate and est_tokens and nd and marker_ttl)
then
  return bad('header arguments')
end
local rollup = ARGV[3] ~= nil
if #KEYS ~= 4 + nl + nw + nc + nd + (rollup and 1 or 0) or #A ~= 14 + 3 * nl + nw then
  return bad('key or argument count')
end
for i = 15, #A do
  if not tonumber(A[i]) then return bad('argument ' .. i) end
end
if rollup and not (tonumber(ARGV[4]) and tonumber(ARGV[5]) and tonumber(ARGV[6])) then
  return bad('rollup arguments')
end

local hold = redis.call('GET', KEYS[2])
local had_hold = hold and hold ~= 'denied'
local first
if marker_ttl == 0 then
  first = had_hold
else
  first = redis.call('SADD', KEYS[1], rid) == 1
  if redis.call('PTTL', KEYS[1]) < marker_ttl then
    redis.call('PEXPIRE', KEYS[1], int(marker_ttl))
  end
end
local reply = {first and 1 or 0}

if first and had_hold then
  redis.call('DEL', KEYS[2])
end
if first then
  redis.call('ZREM', KEYS[3], rid)
end
local charge = first and not cancel

for i = 1, nl do
  local a = lbase + 3 * (i - 1)
  local max, threshold, ttl = tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
  local key = KEYS[klim + i]
  if first and had_hold and estimate ~= 0 then
    if redis.call('HINCRBY', key, 'held', int(0 - estimate)) < 0 then
      redis.call('HSET', key, 'held', '0')  -- never negative, whatever happened (manual reset)
    end
  end
  if charge then
    redis.call('HINCRBY', key, 'spent', int(actual))
    if ttl > 0 then redis.call('PEXPIRE', key, int(ttl)) end
  end
  local state = redis.call('HMGET', key, 'spent', 'held')
  local spent, held = tonumber(state[1]) or 0, tonumber(state[2]) or 0
  local code = 0
  if spent > max then code = 2 elseif spent >= threshold then code = 1 end
  if charge then
    redis.call('HINCRBY', key, ({'ok', 'exceeded', 'overrun'})[code + 1], '1')
  end
  reply[#reply + 1] = spent
  reply[#reply + 1] = held
  reply[#reply + 1] = code
end

if first and had_hold then
  -- Only a reservation that happened charged the windows and took the leases.
  local delta = (cancel and 0 or tokens) - est_tokens
  for i = 1, nw do
    local bucket = int(A[wbase + i])
    -- Correct the bucket the estimate went into, if it is still inside the window.
    if delta ~= 0 and redis.call('HEXISTS', KEYS[kwin + i], bucket) == 1 then
      local value = redis.call('HINCRBY', KEYS[kwin + i], bucket, int(delta))
      if value < 0 then redis.call('HSET', KEYS[kwin + i], bucket, '0') end
    end
  end
  for i = 1, nc do redis.call('ZREM', KEYS[kcon + i], rid) end
end
if charge then
  for i = 1, nd do redis.call('DEL', KEYS[kcon + nc + i]) end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', int(A[6]), '*', 'event', ARGV[2])
  if rollup then
    local r, d = KEYS[#KEYS], ARGV[3]
    redis.call('HINCRBY', r, 'c' .. d, int(actual))
    redis.call('HINCRBY', r, 'n' .. d, '1')
    redis.call('HINCRBY', r, 'i' .. d, ARGV[4])
    redis.call('HINCRBY', r, 'o' .. d, ARGV[5])
    local ttl = tonumber(ARGV[6])
    if ttl > 0 and redis.call('PTTL', r) < ttl then redis.call('PEXPIRE', r, ARGV[6]) end
  end
end
return reply
