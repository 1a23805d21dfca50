-- wrk script for router_compare.sh: POST /v1/completions with a ~1 KB prompt, max_tokens 8.
-- Each request's prompt starts with a per-thread counter, so no router or engine can serve it
-- from a prefix cache (or decide to prefill locally) and every routed request really runs both legs.
local counter = 0
local filler = string.rep("the gateway pairs prefill and decode instances ", 21)
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

local seeded = false
function setup(thread)
  -- Fresh ids every run, so a later run never meets the prompts an earlier one cached.
  if not seeded then math.randomseed(os.time()); seeded = true end
  thread:set("tid", tostring(math.random(1, 1000000000)))
end

request = function()
  counter = counter + 1
  local body = '{"model":"pdgate-sim-8b","max_tokens":8,"prompt":"' .. tid .. "-" .. counter .. " " .. filler .. '"}'
  return wrk.format(nil, "/v1/completions", nil, body)
end
