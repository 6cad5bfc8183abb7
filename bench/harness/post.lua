-- wrk script for the servery benchmarks (driven by bench/harness/wrk.py).
--
-- POSTs JSON bodies round-robin, one body per line of the file named by $WRK_BODIES, so a run
-- sends many distinct rows rather than one cached body. done() prints one machine-readable line
-- with the numbers bench/harness/wrk.py parses: request count, error counts and latency
-- percentiles (us).
-- With $WRK_KEY_HEADER set (e.g. X-Servery-Route-Key), body i is sent with that header set to
-- "key-<i>", so a run carries as many distinct route keys as bodies.

local prepared = {}
local next_index = 0

function init(args)
  local path = os.getenv("WRK_BODIES")
  if path == nil then
    error("WRK_BODIES is not set: bench/harness/wrk.py names the file of request bodies")
  end
  local key_header = os.getenv("WRK_KEY_HEADER")
  for line in io.lines(path) do
    if #line > 0 then
      -- wrk.format fills in Host and Content-Length; one pre-built request per body.
      local headers = { ["Content-Type"] = "application/json" }
      if key_header ~= nil and #key_header > 0 then
        headers[key_header] = "key-" .. (#prepared + 1)
      end
      prepared[#prepared + 1] = wrk.format("POST", nil, headers, line)
    end
  end
  if #prepared == 0 then
    error("no request bodies in " .. path)
  end
end

function request()
  next_index = next_index % #prepared + 1
  return prepared[next_index]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_DONE requests=%d duration_us=%d connect=%d read=%d write=%d status=%d timeout=%d "
      .. "p50_us=%.0f p95_us=%.0f p99_us=%.0f max_us=%.0f\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(95), latency:percentile(99), latency.max
  ))
end
