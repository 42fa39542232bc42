-- wrk script for bench/run.py: POST one fixed JSON body, optionally with a Bearer key.
-- Environment: BENCH_BODY_FILE (the JSON body), BENCH_API_KEY (omit or empty: no Authorization header).
-- No request()/response() hooks, so wrk builds the request once and never enters Lua per request.
-- done() prints a single line "BENCHWRK {json}" that run.py reads.

local path = assert(os.getenv("BENCH_BODY_FILE"), "BENCH_BODY_FILE is required")
local file = assert(io.open(path, "rb"))
wrk.method = "POST"
wrk.body = file:read("*a")
file:close()
wrk.headers["Content-Type"] = "application/json"
local key = os.getenv("BENCH_API_KEY")
if key and key ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. key
end

function done(summary, latency, requests)
  local seconds = summary.duration / 1e6
  local e = summary.errors
  io.write(string.format(
    'BENCHWRK {"requests": %d, "seconds": %.3f, "rps": %.2f, "p50_ms": %.3f, "p90_ms": %.3f, ' ..
    '"p99_ms": %.3f, "max_ms": %.3f, "errors": %d}\n',
    summary.requests, seconds, summary.requests / seconds,
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    latency.max / 1000, e.connect + e.read + e.write + e.status + e.timeout))
end
