--[[ reserve.lua: check every applicable limit, rate window and concurrency lease for one request
and reserve them all, or none. One call, one round trip, atomic.

KEYS
  1            hold record of this request        (string, JSON; deleted by settle)
  2            holds index                        (zset: request id -> deadline ms)
  3 .. 2+L     spend limit state, one per limit   (hash: spent, held, ok, exceeded, overrun, blocked)
  next W       rate windows                       (hash: bucket number -> count)
  next C       concurrency lease sets             (zset: request id -> lease deadline ms)
ARGV
  1  request id
  2  now, unix ms
  3  hold deadline, unix ms (the sweeper settles the hold at the estimate after it)
  4  L    5  W    6  C
  7  estimate, micro-dollars (cost of prompt estimate + max output tokens)
  8  hold record payload (JSON, stored as is; names the keys to correct, for the sweeper)
  then per limit   (4 each): mode (0 allow, 1 block strict, 2 block reactive),
                             max micro-dollars, state key TTL ms (0 = none), unused
  then per window  (4 each): limit, amount to charge, bucket width ms, buckets per window
  then per lease   (2 each): limit, lease deadline ms
Reply
  { allowed (1/0), denied kind (0 none, 1 limit, 2 window, 3 lease), denied index (1-based),
    retry after ms (-1 = never, with this estimate),
    then per limit: spent, held        (after this reservation)
    then per window: used, reset ms    (used after this reservation; ms until it next frees up) }

Window semantics (rolling, conservative): the window is `buckets` buckets wide and the sum covers
the current bucket plus `buckets` older ones, so the oldest bucket, which is only partly inside
the last `buckets * width` ms, is counted in full. No rolling window of that length can ever hold
more than `limit`; the price is that a refused request might have fitted up to one bucket width
earlier than the reported reset.
]]

local rid = ARGV[1]
local now = tonumber(ARGV[2])
local deadline = tonumber(ARGV[3])
local nl, nw, nc = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local estimate = tonumber(ARGV[7])
local payload = ARGV[8]
local lbase, wbase = 8, 8 + 4 * nl
local cbase = wbase + 4 * nw
local klim, kwin = 2, 2 + nl
local kcon = kwin + nw

local denied_kind, denied_index, retry = 0, 0, 0
local window_used, window_reset = {}, {}

-- Concurrency leases first: expired leases are dropped, so a lost request frees its slot.
for i = 1, nc do
  local key = KEYS[kcon + i]
  local limit = tonumber(ARGV[cbase + 2 * (i - 1) + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if denied_kind == 0 and redis.call('ZCARD', key) >= limit then
    denied_kind, denied_index = 3, i
    local first = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    retry = first[2] and math.max(0, tonumber(first[2]) - now) or 1000
  end
end

for i = 1, nw do
  local a = wbase + 4 * (i - 1)
  local limit, amount = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local width, count = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local current = math.floor(now / width)
  local fields = {}
  for b = current - count, current do fields[#fields + 1] = tostring(b) end
  local values = redis.call('HMGET', KEYS[kwin + i], unpack(fields))
  local used = 0
  for j = 1, #values do used = used + (tonumber(values[j]) or 0) end
  -- Time until the oldest non-empty bucket leaves the window.
  local reset = 0
  for j = 1, #values do
    if (tonumber(values[j]) or 0) > 0 then
      reset = (current - count + j - 1 + count + 1) * width - now
      break
    end
  end
  window_used[i], window_reset[i] = used, reset
  if denied_kind == 0 and used + amount > limit then
    denied_kind, denied_index = 2, i
    if amount > limit then
      retry = -1
    else
      -- Drop buckets oldest first until the request fits; the retry is when that bucket leaves.
      local freed = 0
      retry = -1
      for j = 1, #values do
        freed = freed + (tonumber(values[j]) or 0)
        if used - freed + amount <= limit then
          retry = (current - count + j - 1 + count + 1) * width - now
          break
        end
      end
    end
  end
end

local spent, held = {}, {}
for i = 1, nl do
  local a = lbase + 4 * (i - 1)
  local mode, max = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local state = redis.call('HMGET', KEYS[klim + i], 'spent', 'held')
  spent[i], held[i] = tonumber(state[1]) or 0, tonumber(state[2]) or 0
  if denied_kind == 0 then
    if (mode == 1 and spent[i] + held[i] + estimate > max) or (mode == 2 and spent[i] > max) then
      denied_kind, denied_index, retry = 1, i, -1
    end
  end
end

local reply = {}
if denied_kind ~= 0 then
  if denied_kind == 1 then
    redis.call('HINCRBY', KEYS[klim + denied_index], 'blocked', 1)
  end
  reply = {0, denied_kind, denied_index, retry}
else
  for i = 1, nc do
    redis.call('ZADD', KEYS[kcon + i], tonumber(ARGV[cbase + 2 * (i - 1) + 2]), rid)
    redis.call('PEXPIRE', KEYS[kcon + i], 3600000)
  end
  for i = 1, nw do
    local a = wbase + 4 * (i - 1)
    local amount, width, count = tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local current = math.floor(now / width)
    if amount > 0 then
      redis.call('HINCRBY', KEYS[kwin + i], tostring(current), amount)
    end
    -- Old buckets are removed as they leave the window; the TTL covers idle windows.
    redis.call('HDEL', KEYS[kwin + i], tostring(current - count - 1), tostring(current - count - 2))
    redis.call('PEXPIRE', KEYS[kwin + i], (count + 2) * width)
    window_used[i] = window_used[i] + amount
  end
  for i = 1, nl do
    local a = lbase + 4 * (i - 1)
    local ttl = tonumber(ARGV[a + 3])
    redis.call('HINCRBY', KEYS[klim + i], 'held', estimate)
    if ttl > 0 then redis.call('PEXPIRE', KEYS[klim + i], ttl) end
    held[i] = held[i] + estimate
  end
  redis.call('SET', KEYS[1], payload, 'PX', math.max(deadline - now, 0) + 86400000)
  redis.call('ZADD', KEYS[2], deadline, rid)
  reply = {1, 0, 0, 0}
end
for i = 1, nl do reply[#reply + 1] = spent[i]; reply[#reply + 1] = held[i] end
for i = 1, nw do reply[#reply + 1] = window_used[i]; reply[#reply + 1] = window_reset[i] end
return reply
