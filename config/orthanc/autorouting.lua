--[[
gradcam-node auto-routing for Orthanc (AI research output, NOT for diagnostic use).

Every instance Orthanc stores goes through OnStoredInstance below. Chest radiographs (Modality CR or DX,
BodyPartExamined CHEST or absent) are sent to the node, registered in orthanc.json as the DICOM modality
"gradcam". The node analyses them and stores its results back into the same study, calling AE "GRADCAM".

Never routed (so results never loop back to the node):
  - anything the node itself stored (calling AE = NODE_AET),
  - Secondary Capture, Segmentation and Structured Report objects (the node's output classes),
  - anything with Manufacturer "gradcam-node" (the node's outputs carry it),
  - instances stored by Lua (modified copies) and by plugins.

Each routed instance becomes an asynchronous Orthanc job ("DicomModalityStore"). If the node is down the job
fails and stays listed (Orthanc Explorer > Jobs, or GET /jobs); resubmit it with POST /jobs/ID/resubmit.

What a site changes: the settings below (marked SITE). The node's AE title, host and port are in
orthanc.json (DicomModalities "gradcam"); NODE_MODALITY must name that entry and NODE_AET must be its AET.
Orthanc loads this file at start-up ("LuaScripts" in orthanc.json): restart Orthanc after editing it.
]]

-- SITE settings ---------------------------------------------------------------------------------------------

-- The DicomModalities entry of the node in orthanc.json, and the node's AE title (its results call with it).
NODE_MODALITY = 'gradcam'
NODE_AET = 'GRADCAM'

-- Modalities routed to the node. Add e.g. RG here only if the node should see them too.
ROUTED_MODALITIES = { CR = true, DX = true }

-- Body parts routed; an absent or empty BodyPartExamined is routed as well (many CR/DX omit it).
ROUTED_BODY_PARTS = { CHEST = true }

-- Only DICOM stores (and uploads through the REST API / Orthanc Explorer) are routed.
ROUTED_ORIGINS = { DicomProtocol = true, RestApi = true }

-- End of SITE settings --------------------------------------------------------------------------------------

NODE_MANUFACTURER = 'gradcam-node'

-- What the node sends back: Secondary Capture (single- and multi-frame), Segmentation (its heatmaps) and
-- Structured Reports (all kinds).
OUTPUT_SOP_CLASSES = { ['1.2.840.10008.5.1.4.1.1.7'] = true, ['1.2.840.10008.5.1.4.1.1.66.4'] = true }
OUTPUT_SOP_CLASS_PREFIXES = { '1.2.840.10008.5.1.4.1.1.7.', '1.2.840.10008.5.1.4.1.1.88.' }


local function Normalized(value)
   if value == nil then
      return ''
   end
   return string.upper((string.gsub(tostring(value), '^%s*(.-)%s*$', '%1')))
end


local function StartsWith(s, prefix)
   return string.sub(s, 1, string.len(prefix)) == prefix
end


-- Why an instance is not routed, or nil when it is.
function GradcamSkipReason(tags, origin)
   local requestOrigin = origin['RequestOrigin'] or ''
   if not ROUTED_ORIGINS[requestOrigin] then
      return 'origin ' .. requestOrigin
   end
   if Normalized(origin['RemoteAet']) == NODE_AET then
      return 'stored by the node itself (calling AE ' .. NODE_AET .. ')'
   end
   if Normalized(tags['Manufacturer']) == string.upper(NODE_MANUFACTURER) then
      return 'a gradcam-node output (Manufacturer)'
   end
   local sopClass = Normalized(tags['SOPClassUID'])
   if OUTPUT_SOP_CLASSES[sopClass] then
      return 'SOP class ' .. sopClass .. ' (Secondary Capture)'
   end
   for _, prefix in ipairs(OUTPUT_SOP_CLASS_PREFIXES) do
      if StartsWith(sopClass, prefix) then
         return 'SOP class ' .. sopClass .. ' (Secondary Capture / SR)'
      end
   end
   local modality = Normalized(tags['Modality'])
   if not ROUTED_MODALITIES[modality] then
      return 'modality ' .. modality
   end
   local bodyPart = Normalized(tags['BodyPartExamined'])
   if bodyPart ~= '' and not ROUTED_BODY_PARTS[bodyPart] then
      return 'body part ' .. bodyPart
   end
   return nil
end


function OnStoredInstance(instanceId, tags, metadata, origin)
   local reason = GradcamSkipReason(tags, origin)
   if reason ~= nil then
      print('gradcam-node routing: not sent ' .. instanceId .. ': ' .. reason)
      return
   end
   -- Asynchronous: the store job runs in Orthanc's job engine, so a slow or absent node never blocks
   -- reception, and a failure stays visible as a failed job.
   local request = { Resources = { instanceId }, Asynchronous = true, Permissive = false }
   local answer = ParseJson(RestApiPost('/modalities/' .. NODE_MODALITY .. '/store', DumpJson(request, true)))
   print('gradcam-node routing: sent ' .. instanceId .. ' to ' .. NODE_MODALITY .. ', job ' .. tostring(answer['ID']))
end
