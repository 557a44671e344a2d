"""The Lua scripts behind quota/redis: each runs atomically in Redis, on Redis's clock (TIME), so
concurrent processes cannot both take the last of a limit and processes on machines with skewed
clocks agree on the windows.

The token window is a sorted set of "<charge id>:<tokens>" scored by time, beside a running sum
of what it holds (`<tokens>:sum`): a check reads the sum and drops only what expired, so its cost
does not grow with the requests in the window (a scan of the set did: O(requests per minute) per
admission, milliseconds at a thousand requests a second). Both keys get the same TTL at every
write; a sum key that is missing while the set is not is rebuilt once.

The budget is one counter per key and period (`budget:<period>:<start>`), expiring when its period
ends: a reservation adds its tokens only if they fit (used + tokens <= budget), its settlement adds
(used - reserved).
"""

from __future__ import annotations

from .limits import WINDOW

_SUM = """
local function scan_sum(key)
  local total = 0
  for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
    total = total + tonumber(string.match(m, ':(%d+)$'))
  end
  return total
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
-- drops the charges older than the window; returns the tokens still in it
local function token_sum(key, sumkey, now)
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - __WINDOW__)
  local sum = redis.call('GET', sumkey)
  if not sum then
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - __WINDOW__)
    sum = scan_sum(key)
    redis.call('SET', sumkey, sum, 'EX', __TTL__)
    return sum
  end
  sum = tonumber(sum)
  if #old > 0 then
    for _, m in ipairs(old) do sum = sum - tonumber(string.match(m, ':(%d+)$')) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now - __WINDOW__)
    redis.call('SET', sumkey, sum, 'KEEPTTL')
  end
  return sum
end
local function add_budget(key, tokens, ends)
  local v = redis.call('INCRBY', key, tokens)
  redis.call('EXPIREAT', key, ends)
  return v
end
"""

# KEYS: requests, tokens, in-flight leases, tokens' sum, budget counter. ARGV: rpm, tpm, request
# id, max_parallel, lease seconds, budget_tokens, tokens owed to the budget (charged here while
# Redis did not answer), the budget period's end.
# -> {1, budget used} or {0, which, retry_after, used}
ADMIT = _SUM + """
local now = clock()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - __WINDOW__)
local rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2])
local maxp, lease, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
if tonumber(ARGV[7]) ~= 0 then add_budget(KEYS[5], tonumber(ARGV[7]), ARGV[8]) end
if maxp > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)     -- leases nobody renewed: a dead holder
  if redis.call('ZCARD', KEYS[3]) >= maxp then return {0, 'parallel', '1', '0'} end
end
if rpm > 0 and redis.call('ZCARD', KEYS[1]) >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, 'rpm', tostring(tonumber(oldest[2]) + __WINDOW__ - now), '0'}
end
if tpm > 0 then
  local used = token_sum(KEYS[2], KEYS[4], now)
  if used >= tpm then
    local oldest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
    return {0, 'tpm', tostring(tonumber(oldest[2]) + __WINDOW__ - now), tostring(used)}
  end
end
local spent = 0
if budget > 0 then
  spent = tonumber(redis.call('GET', KEYS[5]) or '0')
  if spent >= budget then return {0, 'budget', '0', tostring(spent)} end
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('EXPIRE', KEYS[1], __TTL__)
if maxp > 0 then
  redis.call('ZADD', KEYS[3], now + lease, ARGV[3])
  redis.call('EXPIRE', KEYS[3], math.ceil(lease * 2))
end
return {1, tostring(spent)}
"""

# KEYS: tokens, tokens' sum, budget counter. ARGV: tpm, charge id, tokens, check (1: refuse past
# tpm or the budget), budget_tokens, the budget period's end.
# -> {1, budget used} or {0, which, used}
RESERVE = _SUM + """
local now = clock()
local tpm, tokens, budget = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[5])
local check = ARGV[4] == '1'
local used = 0
if tpm > 0 then
  used = token_sum(KEYS[1], KEYS[2], now)
  if check and used + tokens > tpm then return {0, 'tpm', tostring(used)} end
end
local spent = 0
if budget > 0 then
  spent = tonumber(redis.call('GET', KEYS[3]) or '0')
  if check and spent + tokens > budget then return {0, 'budget', tostring(spent)} end
  spent = add_budget(KEYS[3], tokens, ARGV[6])
end
if tpm > 0 then
  redis.call('ZADD', KEYS[1], now, ARGV[2] .. ':' .. ARGV[3])
  redis.call('SET', KEYS[2], used + tokens, 'EX', __TTL__)
  redis.call('EXPIRE', KEYS[1], __TTL__)
end
return {1, tostring(spent)}
"""

# KEYS: tokens, tokens' sum, budget counter. ARGV: charge id, reserved, used, 1 if the budget was
# charged at reserve, the budget period's end. The charge keeps its time; gone (and out of the
# sum) if it expired meanwhile. An overage (used > reserved) is charged in both. -> budget used
SETTLE = _SUM + """
local old = ARGV[1] .. ':' .. ARGV[2]
local delta = tonumber(ARGV[3]) - tonumber(ARGV[2])
local score = redis.call('ZSCORE', KEYS[1], old)
if score then
  redis.call('ZREM', KEYS[1], old)
  redis.call('ZADD', KEYS[1], score, ARGV[1] .. ':' .. ARGV[3])
  if redis.call('EXISTS', KEYS[2]) == 1 then
    redis.call('INCRBY', KEYS[2], delta)
  end
end
if ARGV[4] == '1' and delta ~= 0 then
  return tostring(add_budget(KEYS[3], delta, ARGV[5]))
end
return redis.call('GET', KEYS[3]) or '0'
"""

# KEYS: in-flight leases, one per id. ARGV: lease seconds, ids. Only leases still held are renewed.
RENEW = """
local t = redis.call('TIME')
local until_ = tonumber(t[1]) + tonumber(t[2]) / 1000000 + tonumber(ARGV[1])
for i, k in ipairs(KEYS) do
  redis.call('ZADD', k, 'XX', until_, ARGV[i + 1])
  redis.call('EXPIRE', k, math.ceil(tonumber(ARGV[1]) * 2))
end
return 1
"""

RELEASE = "redis.call('ZREM', KEYS[1], ARGV[1]) return 1"


def _lua(source: str) -> str:
    return source.replace("__WINDOW__", str(WINDOW)).replace("__TTL__", str(int(WINDOW) + 1))


ADMIT, RESERVE, SETTLE = _lua(ADMIT), _lua(RESERVE), _lua(SETTLE)
