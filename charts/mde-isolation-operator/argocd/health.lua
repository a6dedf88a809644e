-- Argo CD health check for isolation.mde.dev/DeviceIsolation, DeviceIsolationSet, MdeConnection
-- and ClusterMdeConnection (see docs/gitops.md): all report the same conditions, and this script
-- reads nothing else.
--
-- Put this script in the argocd-cm ConfigMap under the keys
-- resource.customizations.health.isolation.mde.dev_DeviceIsolation
-- resource.customizations.health.isolation.mde.dev_DeviceIsolationSet
-- resource.customizations.health.isolation.mde.dev_MdeConnection
-- resource.customizations.health.isolation.mde.dev_ClusterMdeConnection
--
--   Healthy      Ready=True, and both status.observedGeneration and the Ready condition's
--                observedGeneration equal metadata.generation
--   Degraded     Stalled=True (for the current generation): a person must act; the message
--                is "<reason>: <message>"
--   Progressing  everything else: no status yet, a spec change the operator has not observed,
--                Reconciling (an action pending, waiting for quota, a retry scheduled; a set
--                rolling out, in its canary, or paused; a connection being verified)
--
-- Argo CD runs health checks with gopher-lua (Lua 5.1): keep to Lua 5.1.
local hs = {}

local function condition(conditions, name)
  if conditions == nil then
    return nil
  end
  for _, c in ipairs(conditions) do
    if c.type == name then
      return c
    end
  end
  return nil
end

local function describe(c)
  if c.message ~= nil and c.message ~= "" then
    return c.reason .. ": " .. c.message
  end
  return c.reason
end

local generation = nil
if obj.metadata ~= nil then
  generation = obj.metadata.generation
end
local status = obj.status

if status == nil or status.conditions == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to report status"
  return hs
end

if generation ~= nil and status.observedGeneration ~= generation then
  hs.status = "Progressing"
  hs.message = string.format("Waiting for the operator to observe generation %d (status is for %s)",
    generation, tostring(status.observedGeneration))
  return hs
end

local ready = condition(status.conditions, "Ready")
local stalled = condition(status.conditions, "Stalled")
local reconciling = condition(status.conditions, "Reconciling")

-- A condition computed for an older generation says nothing about this one.
local function current(c)
  return c ~= nil and (generation == nil or c.observedGeneration == nil or c.observedGeneration == generation)
end

if current(stalled) and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = describe(stalled)
  return hs
end

if current(reconciling) and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = describe(reconciling)
  return hs
end

if current(ready) and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = describe(ready)
  return hs
end

hs.status = "Progressing"
if ready ~= nil then
  hs.message = describe(ready)
else
  hs.message = "Waiting for the Ready condition"
end
return hs
