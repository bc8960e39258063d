-- Argo CD health check for kubetune jobs (FineTuneJob, QuantizeJob).
-- Reads the Succeeded condition the operator keeps current, per the Kubernetes API conventions.
local hs = {}
if obj.status == nil or obj.status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick the job up"
  return hs
end
if obj.metadata.generation ~= nil and obj.status.observedGeneration ~= obj.metadata.generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to observe the latest spec"
  return hs
end
for _, condition in ipairs(obj.status.conditions) do
  if condition.type == "Succeeded" then
    local message = condition.reason or ""
    if condition.message ~= nil and condition.message ~= "" then
      message = message .. ": " .. condition.message
    end
    if condition.status == "True" then
      hs.status = "Healthy"
    elseif condition.status == "False" then
      hs.status = "Degraded"
    else
      hs.status = "Progressing"
    end
    hs.message = message
    return hs
  end
end
hs.status = "Progressing"
hs.message = "Waiting for the Succeeded condition"
return hs
