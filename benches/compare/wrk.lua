-- wrk script for benches/compare.sh.
-- WRK_BODY_BYTES=N turns each request into a POST with an N-byte body.
-- At the end it prints one line "WRKJSON {...}" that compare.sh picks up.
local body_bytes = tonumber(os.getenv("WRK_BODY_BYTES") or "0") or 0
if body_bytes > 0 then
  wrk.method = "POST"
  wrk.body = string.rep("x", body_bytes)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"err_connect":%d,"err_read":%d,' ..
    '"err_write":%d,"err_status":%d,"err_timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.mean, latency.max))
end
