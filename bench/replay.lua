-- wrk script: replay pre-signed raw HTTP/1.1 requests, round robin.
-- Usage: wrk ... -s bench/replay.lua https://HOST:PORT/ -- REQUESTS_FILE
-- The file holds each request preceded by its length on a line of its own.
-- Connections go to 127.0.0.1 whatever the URL's host (which stays the TLS SNI).

function wrk.resolve(host, service)
   wrk.addrs = wrk.lookup("127.0.0.1", service)
end

local requests = {}
local count = 0
local index = 0

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local data = f:read("*all")
   f:close()
   local pos = 1
   while pos <= #data do
      local nl = string.find(data, "\n", pos, true)
      local n = tonumber(string.sub(data, pos, nl - 1))
      count = count + 1
      requests[count] = string.sub(data, nl + 1, nl + n)
      pos = nl + 1 + n
   end
   index = math.random(count) - 1
end

function request()
   index = index % count + 1
   return requests[index]
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'BENCH-RESULT {"duration_us":%d,"requests":%d,"bytes":%d,"connect":%d,"read":%d,' ..
      '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
      summary.duration, summary.requests, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
