--[[ settle.lua: record what one request really cost, release what it reserved, and append its
usage event, all at once. Idempotent per request id: a second settle of the same id changes
nothing and replies with settled = 0.

KEYS
  1            done marker of this request       (string; SET NX decides who settles)
  2            hold record of this request       (string, JSON; may be absent: nothing reserved)
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
  3  actual cost, micro-dollars
  4  actual tokens (input + output)
  5  usage event (serialized tollgate.v1.UsageEvent)
  6  usage stream max length (approximate trim)
  7  L    8  W    9  C
  10 held estimate, micro-dollars, to release (0 when nothing was reserved)
  11 estimated tokens charged to the token windows at reservation
  12 D
  then per limit  (3 each): max micro-dollars, threshold micro-dollars, state key TTL ms
  then per window (1 each): bucket number charged at reservation
Reply
  { settled (1 first time, 0 already settled), then per limit: spent, held, state code
    (0 ok, 1 exceeded, 2 overrun) }
]]
local A = cjson.decode(ARGV[1])

local rid = A[1]
local actual = tonumber(A[3])
local tokens = tonumber(A[4])
local nl, nw, nc = tonumber(A[7]), tonumber(A[8]), tonumber(A[9])
local estimate = tonumber(A[10])
local est_tokens = tonumber(A[11])
local nd = tonumber(A[12])
local lbase, wbase = 12, 12 + 3 * nl
local klim, kwin = 4, 4 + nl
local kcon = kwin + nw

-- Validate everything before the first write: a Lua error after a write would leave the
-- settlement half applied (scripts are atomic, not transactional).
local function bad(what) return redis.error_reply('ERR settle.lua: bad ' .. what) end
if not (actual and tokens and nl and nw and nc and estimate and est_tokens and nd) then
  return bad('header arguments')
end
if #KEYS ~= 4 + nl + nw + nc + nd or #A ~= 12 + 3 * nl + nw then
  return bad('key or argument count')
end
for i = 13, #A do
  if not tonumber(A[i]) then return bad('argument ' .. i) end
end

local first = redis.call('SET', KEYS[1], '1', 'NX', 'PX', 172800000)
local reply = {first and 1 or 0}

if first then
  redis.call('DEL', KEYS[2])
  redis.call('ZREM', KEYS[3], rid)
end

for i = 1, nl do
  local a = lbase + 3 * (i - 1)
  local max, threshold, ttl = tonumber(A[a + 1]), tonumber(A[a + 2]), tonumber(A[a + 3])
  local key = KEYS[klim + i]
  local spent, held
  if first then
    -- `0 - estimate`, not `-estimate`: Lua's -0 would reach Redis as "-0", which HINCRBY
    -- rejects (and a script error after the writes above would leave them half done).
    held = redis.call('HINCRBY', key, 'held', 0 - estimate)
    if held < 0 then  -- never negative, whatever happened to the hold (e.g. a manual reset)
      redis.call('HSET', key, 'held', 0)
      held = 0
    end
    spent = redis.call('HINCRBY', key, 'spent', actual)
    if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
  else
    local state = redis.call('HMGET', key, 'spent', 'held')
    spent, held = tonumber(state[1]) or 0, tonumber(state[2]) or 0
  end
  local code = 0
  if spent > max then code = 2 elseif spent >= threshold then code = 1 end
  if first then
    redis.call('HINCRBY', key, ({'ok', 'exceeded', 'overrun'})[code + 1], 1)
  end
  reply[#reply + 1] = spent
  reply[#reply + 1] = held
  reply[#reply + 1] = code
end

if first then
  local delta = tokens - est_tokens
  for i = 1, nw do
    local bucket = A[wbase + i]
    -- Correct the bucket the estimate went into, if it is still inside the window.
    if delta ~= 0 and redis.call('HEXISTS', KEYS[kwin + i], bucket) == 1 then
      local value = redis.call('HINCRBY', KEYS[kwin + i], bucket, delta)
      if value < 0 then redis.call('HSET', KEYS[kwin + i], bucket, 0) end
    end
  end
  for i = 1, nc do redis.call('ZREM', KEYS[kcon + i], rid) end
  for i = 1, nd do redis.call('DEL', KEYS[kcon + nc + i]) end
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', A[6], '*', 'event', ARGV[2])
end
return reply
