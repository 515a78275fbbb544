-- Argo CD health of a TrainPilot AgentExperiment (trainpilot.dev/v1alpha1).
-- The status is the operator's AgentExperimentStatus (operator/trainpilot/api/experiment.py; the
-- CRD in crds/agentexperiments.trainpilot.dev.yaml): phase, message, observedGeneration,
-- conditions, trialsSummary, bestObjective. docs/gitops.md explains how to install this script.
--
-- Argo CD runs a health script from argocd-cm without Lua's standard libraries (unless
-- resource.customizations.useOpenLibs is set), so only base functions and table.* are used here:
-- no string.*, no math.*, no string methods.

local FINALIZER = "trainpilot.dev/daemons"

-- An integer as is; anything else to 4 significant digits, as the operator's own messages print
-- objectives. Rounding before tostring also makes gopher-lua (Argo CD) and C Lua print the same.
local function number(value)
  if type(value) ~= "number" or value ~= value or value == 1 / 0 or value == -1 / 0 then
    return tostring(value)
  end
  if value % 1 == 0 and value < 1e15 and value > -1e15 then
    return tostring(value)
  end
  local sign = ""
  if value < 0 then
    sign, value = "-", -value
  end
  local power, steps = 1, 0
  if value >= 10000 then
    while value / power >= 10000 and steps < 40 do
      power, steps = power * 10, steps + 1
    end
    local scaled = value / power + 0.5
    return sign .. tostring((scaled - scaled % 1) * power)
  end
  while value * power < 1000 and steps < 40 do
    power, steps = power * 10, steps + 1
  end
  local scaled = value * power + 0.5
  return sign .. tostring((scaled - scaled % 1) / power)
end

local function text(value)
  if type(value) == "string" and value ~= "" then
    return value
  end
  return nil
end

-- "trials 3/4, best val_loss 1.234": the columns `kubectl get aexp` prints.
local function summary(status, spec)
  local parts = {}
  local trials = text(status.trialsSummary)
  if trials ~= nil and trials ~= "0/0" then
    table.insert(parts, "trials " .. trials)
  end
  if type(status.bestObjective) == "number" then
    local metric = "objective"
    if type(spec) == "table" and type(spec.objective) == "table" and text(spec.objective.metric) then
      metric = spec.objective.metric
    end
    table.insert(parts, "best " .. metric .. " " .. number(status.bestObjective))
  end
  return parts
end

-- Conditions worth a look: any that is False (they all say "healthy" when True), and a True
-- AwaitingApproval (decisions held for a human). Valid=False is the Invalid phase's own message.
local function notes(conditions)
  local found = {}
  if type(conditions) ~= "table" then
    return found
  end
  for _, condition in ipairs(conditions) do
    if type(condition) == "table" and condition.type ~= "Valid" then
      local flagged
      if condition.type == "AwaitingApproval" then
        flagged = condition.status == "True"
      else
        flagged = condition.status == "False"
      end
      if flagged then
        local note = tostring(condition.type) .. "=" .. tostring(condition.status)
        if text(condition.message) then
          note = note .. ": " .. condition.message
        end
        table.insert(found, note)
      end
    end
  end
  return found
end

local function condition_message(conditions, wanted_type, wanted_status)
  if type(conditions) ~= "table" then
    return nil
  end
  for _, condition in ipairs(conditions) do
    if type(condition) == "table" and condition.type == wanted_type and condition.status == wanted_status then
      return text(condition.message)
    end
  end
  return nil
end

-- "Running (trials 1/4, best val_loss 2.414): <status.message>; <notes>"
local function describe(phase, status, spec, message)
  local described = phase
  local parts = summary(status, spec)
  if #parts > 0 then
    described = described .. " (" .. table.concat(parts, ", ") .. ")"
  end
  local tail = {}
  if message ~= nil then
    table.insert(tail, message)
  end
  for _, note in ipairs(notes(status.conditions)) do
    table.insert(tail, note)
  end
  if #tail > 0 then
    described = described .. ": " .. table.concat(tail, "; ")
  end
  return described
end

local function health(status, message)
  return { status = status, message = message }
end

local metadata = obj.metadata or {}
local spec = obj.spec
local status = obj.status

-- Argo CD itself reports "Pending deletion" before it runs a script; this says why it may take a
-- moment: the operator's finalizer stays until the experiment's agent daemon has stopped.
if metadata.deletionTimestamp ~= nil then
  if type(metadata.finalizers) == "table" then
    for _, finalizer in ipairs(metadata.finalizers) do
      if finalizer == FINALIZER then
        return health("Progressing", "Pending deletion: the operator stops the experiment's agent, then removes "
          .. "its finalizer " .. FINALIZER)
      end
    end
  end
  return health("Progressing", "Pending deletion")
end

if type(status) ~= "table" or text(status.phase) == nil then
  return health("Progressing", "Waiting for the operator")
end

local phase = status.phase

-- Whatever the phase says, it is about an older spec until the operator has acted on this one.
local generation = metadata.generation
local observed = status.observedGeneration
if type(observed) ~= "number" or (type(generation) == "number" and observed < generation) then
  local wanted = "the latest spec"
  if type(generation) == "number" then
    wanted = "generation " .. tostring(generation) .. " of the spec"
  end
  local seen = "status has no observedGeneration"
  if type(observed) == "number" then
    seen = "status is of generation " .. tostring(observed)
  end
  return health("Progressing", "Waiting for the operator to act on " .. wanted .. " (" .. seen .. ", phase "
    .. phase .. ")")
end

if phase == "Succeeded" then
  return health("Healthy", describe(phase, status, spec, text(status.message)))
end
if phase == "Failed" or phase == "Invalid" then
  local why = text(status.message) or condition_message(status.conditions, "Valid", "False")
  return health("Degraded", describe(phase, status, spec, why))
end
if phase == "Suspended" then
  return health("Suspended", describe(phase, status, spec, text(status.message)))
end
if phase == "Running" or phase == "Pending" then
  return health("Progressing", describe(phase, status, spec, text(status.message)))
end
return health("Unknown", "Unknown phase " .. phase .. ": this health check is older than the operator")
