--[[ reserve.lua: check every applicable limit, rate window and concurrency lease for one request
and reserve them all, or none. One call, one round trip, atomic. Money is integer NANO-dollars.

KEYS
  1            hold record of this request        (string, JSON; deleted by settle)
  2            holds index                        (zset: request id -> deadline ms)
  3            unconfirmed set of this request's time bucket (set; see settle.lua): when it
               holds this request, the request was already given up or settled, and nothing
               is done
  4 .. 3+L     spend limit state, one per limit   (hash: spent, held, ok, exceeded, overrun, blocked)
  next W       rate windows                       (hash: bucket number -> count)
  next C       concurrency lease sets             (zset: request id -> lease deadline ms)
  next 1       round-robin counter of the upstream (only when K > 0)
  next 3*K     per credential candidate: cooldown marker, requests window, tokens window
ARGV (1: a JSON array holding the positional values below, so that the client encodes one
      argument instead of dozens; 2: the hold record payload, item 8 of the array being a
      placeholder)
  1  request id
  2  now, unix ms
  3  hold deadline, unix ms (the sweeper settles the hold at the estimate after it)
  4  L    5  W    6  C
  7  estimate, nano-dollars (upper bound of the request's cost)
  8  hold record payload (JSON, stored as is; names the keys to correct, for the sweeper)
  then per limit   (4 each): mode (0 allow, 1 block strict, 2 block reactive),
                             max nano-dollars, state key TTL ms (0 = none), unused
  then per window  (4 each): limit, amount to charge, bucket width ms, buckets per window
  then per lease   (2 each): limit, lease deadline ms
  then K, P (candidates, of which the first P are primaries), bucket width ms, buckets, tokens
  then per candidate (2 each): requests per minute, tokens per minute (0 = no cap)
Reply
  { allowed (1/0), denied kind (0 none, 1 limit, 2 window, 3 lease), denied index (1-based),
    retry after ms (-1 = never, with this estimate),
    then per limit: spent, held        (after this reservation)
    then per window: used, reset ms    (used after this reservation; ms until it next frees up)
    then chosen credential candidate (1-based, 0 = none), its requests used, its tokens used }
  Denied kind 4: no credential candidate is available (all cooling down or at their caps).
  Denied kind 5: the request was settled or given up before this call ran (a call delayed by
  a stalled Redis after its client timed out): nothing is reserved.

Credentials: primaries are tried round robin (the counter picks the first one to try), each
skipped while its cooldown marker exists or its windows are full; fallbacks only after every
primary, round robin among themselves too.

Window semantics (rolling, conservative): the window is `buckets` buckets wide and the sum covers
the current bucket plus `buckets` older ones, so the oldest bucket, which is only partly inside
the last `buckets * width` ms, is counted in full. No rolling window of that length can ever hold
more than `limit`; the price is that a refused request might have fitted up to one bucket width
earlier than the reported reset.
]]
local A = cjson.decode(ARGV[1])
-- Numbers go to redis.call as integer strings made here. Amounts must be exact (Lua would print
-- 14 significant digits, "3e+14" for $300,000 in nano-dollars, which HINCRBY rejects), and a
-- number passed as is costs Redis a "%.17g" sprintf, tostring() a "%.14g" one: about five times
-- the instructions of "%d", and these conversions were ~13 % of Redis' work per request.
local fmt = string.format
local function int(x) return fmt('%d', x) end

local rid = A[1]
local now = tonumber(A[2])
local deadline = tonumber(A[3])
local nl, nw, nc = tonumber(A[4]), tonumber(A[5]), tonumber(A[6])
local estimate = tonumber(A[7])
local payload = ARGV[2]
local lbase, wbase = 8, 8 + 4 * nl
local cbase = wbase + 4 * nw
local klim, kwin = 3, 3 + nl
local kcon = kwin + nw
local kcred = kcon + nc
local pbase = cbase + 2 * nc
local nk = tonumber(A[pbase + 1]) or 0
local np = tonumber(A[pbase + 2]) or 0
local cwidth, ccount = tonumber(A[pbase + 3]) or 1, tonumber(A[pbase + 4]) or 1
local ctokens = tonumber(A[pbase + 5]) or 0

local denied_kind, denied_index, retry = 0, 0, 0

-- Idempotent per request id: a client retry of a call that already ran must not hold twice.
-- Kind -1 skips every check and charge below and answers "allowed" with the current states.
-- A retried refusal is answered again, but counted once ("denied" marks the hold key briefly).
local prior = redis.call('GET', KEYS[1])
local denied_before = prior == 'denied'
if prior and not denied_before then denied_kind = -1 end
if denied_kind == 0 and redis.call('SISMEMBER', KEYS[3], rid) == 1 then
  denied_kind = 5
end
local window_used, window_reset = {}, {}
-- The bucket fields (oldest first, the current one last) of a window; windows of the same
-- width and length (a rate limit's requests and tokens) share one list.
local bucket_lists = {}
local function bucket_fields(current, count)
  local cached = bucket_lists[current]
  if cached and cached.count == count then return cached end
  local fields = {count = count}
  for b = current - count, current do fields[#fields + 1] = int(b) end
  bucket_lists[current] = fields
  return fields
end

-- Concurrency leases first: expired leases are dropped, so a lost request frees its slot.
for i = 1, nc do
  local key = KEYS[kcon + i]
  local limit = tonumber(A[cbase + 2 * (i - 1) + 1])
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now))
  if denied_kind == 0 and redis.call('ZCARD', key) >= limit then
    denied_kind, denied_index = 3, i
    local first = redis.call('ZRANGE', key, '0', '0', 'WITHSCORES')
    retry = first[2] and math.max(0, tonumber(first[2]) - now) or 1000
  end
end

for i = 1, nw do
  local a = wbase + 4 * (i - 1)
  local limit, amount = tonumber(A[a + 1]), tonumber(A[a + 2])
  local width, count = tonumber(A[a + 3]), tonumber(A[a + 4])
  local current = math.floor(now / width)
  local values = redis.call('HMGET', KEYS[kwin + i], unpack(bucket_fields(current, count)))
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
  local mode, max = tonumber(A[a + 1]), tonumber(A[a + 2])
  local state = redis.call('HMGET', KEYS[klim + i], 'spent', 'held')
  spent[i], held[i] = tonumber(state[1]) or 0, tonumber(state[2]) or 0
  if denied_kind == 0 then
    if (mode == 1 and spent[i] + held[i] + estimate > max) or (mode == 2 and spent[i] > max) then
      denied_kind, denied_index, retry = 1, i, -1
    end
  end
end

-- Credential choice comes last: a request refused for any other reason moves no counter.
local chosen, chosen_req, chosen_tok = 0, 0, 0
local function window_sum(key, current)
  local total = 0
  local fields = bucket_fields(current, ccount)
  for _, v in ipairs(redis.call('HMGET', key, unpack(fields))) do total = total + (tonumber(v) or 0) end
  return total
end
if denied_kind == 0 and nk > 0 then
  local rr = redis.call('INCR', KEYS[kcred + 1])
  redis.call('PEXPIRE', KEYS[kcred + 1], '86400000')
  local order = {}
  for k = 0, np - 1 do order[#order + 1] = ((rr - 1 + k) % np) + 1 end
  -- Fallbacks take turns as well (the same counter), after every primary.
  local nf = nk - np
  for k = 0, nf - 1 do order[#order + 1] = np + ((rr - 1 + k) % nf) + 1 end
  local current = math.floor(now / cwidth)
  local soonest = -1
  for _, idx in ipairs(order) do
    local base = kcred + 1 + 3 * (idx - 1)
    local rpm = tonumber(A[pbase + 5 + 2 * (idx - 1) + 1])
    local tpm = tonumber(A[pbase + 5 + 2 * (idx - 1) + 2])
    local cool = redis.call('PTTL', KEYS[base + 1])
    if cool > 0 then
      if soonest < 0 or cool < soonest then soonest = cool end
    else
      local req = window_sum(KEYS[base + 2], current)
      local tok = window_sum(KEYS[base + 3], current)
      if (rpm == 0 or req + 1 <= rpm) and (tpm == 0 or tok + ctokens <= tpm) then
        chosen, chosen_req, chosen_tok = idx, req + 1, tok + ctokens
        break
      end
      if soonest < 0 or cwidth < soonest then soonest = cwidth end
    end
  end
  if chosen == 0 then
    denied_kind, denied_index, retry = 4, 0, soonest
  end
end

local reply = {}
if denied_kind == -1 then
  reply = {1, 0, 0, 0}
elseif denied_kind ~= 0 then
  if denied_kind == 1 and not denied_before then
    redis.call('HINCRBY', KEYS[klim + denied_index], 'blocked', '1')
  end
  if denied_kind ~= 5 then redis.call('SET', KEYS[1], 'denied', 'PX', '60000') end
  reply = {0, denied_kind, denied_index, retry}
else
  for i = 1, nc do
    redis.call('ZADD', KEYS[kcon + i], int(A[cbase + 2 * (i - 1) + 2]), rid)
    redis.call('PEXPIRE', KEYS[kcon + i], '3600000')
  end
  for i = 1, nw do
    local a = wbase + 4 * (i - 1)
    local amount, width, count = tonumber(A[a + 2]), tonumber(A[a + 3]), tonumber(A[a + 4])
    local current = math.floor(now / width)
    if amount > 0 then
      local fields = bucket_fields(current, count)
      redis.call('HINCRBY', KEYS[kwin + i], fields[#fields], int(amount))
    end
    -- Old buckets are removed as they leave the window; the TTL covers idle windows.
    redis.call('HDEL', KEYS[kwin + i], int(current - count - 1), int(current - count - 2))
    redis.call('PEXPIRE', KEYS[kwin + i], int((count + 2) * width))
    window_used[i] = window_used[i] + amount
  end
  for i = 1, nl do
    local a = lbase + 4 * (i - 1)
    local ttl = tonumber(A[a + 3])
    redis.call('HINCRBY', KEYS[klim + i], 'held', int(estimate))
    if ttl > 0 then redis.call('PEXPIRE', KEYS[klim + i], int(ttl)) end
    held[i] = held[i] + estimate
  end
  if chosen > 0 then
    local base = kcred + 1 + 3 * (chosen - 1)
    local current = int(math.floor(now / cwidth))
    local ttl = int((ccount + 2) * cwidth)
    redis.call('HINCRBY', KEYS[base + 2], current, '1')
    redis.call('PEXPIRE', KEYS[base + 2], ttl)
    if ctokens > 0 then
      redis.call('HINCRBY', KEYS[base + 3], current, int(ctokens))
      redis.call('PEXPIRE', KEYS[base + 3], ttl)
    end
  end
  redis.call('SET', KEYS[1], payload, 'PX', int(math.max(deadline - now, 0) + 86400000))
  redis.call('ZADD', KEYS[2], int(deadline), rid)
  reply = {1, 0, 0, 0}
end
for i = 1, nl do reply[#reply + 1] = spent[i]; reply[#reply + 1] = held[i] end
for i = 1, nw do reply[#reply + 1] = window_used[i]; reply[#reply + 1] = window_reset[i] end
reply[#reply + 1] = chosen
reply[#reply + 1] = chosen_req
reply[#reply + 1] = chosen_tok
return reply
