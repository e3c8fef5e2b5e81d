// Read a radtriage SR and SEG the way OHIF does: dcmjs parses the files, the
// @cornerstonejs/adapters walk the TID 1500 measurement groups (MeasurementReport.generateToolState)
// and turn the SEG into labelmaps over the T2W source images (Segmentation.generateToolState).
// Usage: node read_results.mjs INPUT.json  (INPUT: {"sr": path, "seg": path|null, "t2w": [paths]})
// Prints one JSON object: {sr: {templateId, groups: [...]}, seg: {segments, voxels} | null}.
import { readFileSync } from "node:fs";
import dcmjs from "dcmjs";
import { adaptersSEG, adaptersSR } from "@cornerstonejs/adapters";

const { DicomMessage, DicomMetaDictionary } = dcmjs.data;

function load(path) {
  const bytes = readFileSync(path);
  const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
  const file = DicomMessage.readFile(buffer);
  const dataset = DicomMetaDictionary.naturalizeDataset(file.dict);
  dataset._meta = DicomMetaDictionary.namifyDataset(file.meta);
  return { buffer, dataset };
}

const list = (v) => (v === undefined ? [] : Array.isArray(v) ? v : [v]);
const code = (seq) => {
  const c = list(seq)[0];
  return c ? { value: c.CodeValue, scheme: c.CodingSchemeDesignator, meaning: c.CodeMeaning } : null;
};

// What a viewer shows of one measurement group: its items by concept name.
function describeGroup(group) {
  const out = { findingSites: [], measurements: [], evaluations: [], texts: [] };
  for (const item of list(group.ContentSequence)) {
    const name = code(item.ConceptNameCodeSequence);
    if (name.meaning === "Tracking Identifier") out.trackingIdentifier = item.TextValue;
    else if (name.meaning === "Tracking Unique Identifier") out.trackingUid = item.UID;
    else if (item.ValueType === "NUM") {
      const mv = list(item.MeasuredValueSequence)[0];
      out.measurements.push({
        name,
        value: Number(mv.NumericValue),
        unit: code(mv.MeasurementUnitsCodeSequence),
      });
    } else if (item.ValueType === "CODE") {
      const value = code(item.ConceptCodeSequence);
      if (name.value === "121071") out.finding = value;
      else if (name.value === "363698007") out.findingSites.push(value);
      else out.evaluations.push({ name, value });
    } else if (item.ValueType === "TEXT") out.texts.push({ name, value: item.TextValue });
    else if (item.ValueType === "IMAGE" && name.value === "121191") {
      const ref = list(item.ReferencedSOPSequence)[0];
      out.referencedSegment = {
        sopInstanceUid: ref.ReferencedSOPInstanceUID,
        segmentNumber: Number(list(ref.ReferencedSegmentNumber)[0]),
      };
    }
  }
  return out;
}

function readSr(path) {
  const { dataset } = load(path);
  const groups = [];
  // The adapters' own TID 1500 walk: checks the template id, finds "Imaging Measurements" and
  // each "Measurement Group" with its tracking identifiers, then asks the hook for a tool.
  const hooks = {
    getToolClass: () => ({
      toolType: "radtriage",
      getMeasurementData: (group) => {
        const described = describeGroup(group);
        groups.push(described);
        return described;
      },
    }),
  };
  const state = adaptersSR.Cornerstone3D.MeasurementReport.generateToolState(
    dataset,
    {},
    {},
    hooks,
  );
  return {
    templateId: list(dataset.ContentTemplateSequence)[0]?.TemplateIdentifier,
    toolStateGroups: (state.radtriage || []).length,
    groups,
  };
}

async function readSeg(path, t2wPaths) {
  const instances = new Map();
  for (const p of t2wPaths) instances.set(`file:${p}`, load(p).dataset);
  const imageIds = [...instances.keys()];
  const metadataProvider = {
    get(type, imageId) {
      const ds = instances.get(imageId);
      if (!ds) return undefined;
      if (type === "instance") return ds;
      if (type === "generalSeriesModule") return { seriesInstanceUID: ds.SeriesInstanceUID };
      if (type === "generalImageModule") return { sopInstanceUID: ds.SOPInstanceUID };
      if (type === "imagePlaneModule") {
        const iop = ds.ImageOrientationPatient.map(Number);
        return {
          rowCosines: iop.slice(0, 3),
          columnCosines: iop.slice(3),
          imagePositionPatient: ds.ImagePositionPatient.map(Number),
          rows: ds.Rows,
          columns: ds.Columns,
          pixelSpacing: ds.PixelSpacing.map(Number),
          frameOfReferenceUID: ds.FrameOfReferenceUID,
        };
      }
      return undefined;
    },
  };
  const { buffer } = load(path);
  const state = await adaptersSEG.Cornerstone.Segmentation.generateToolState(
    imageIds,
    buffer,
    metadataProvider,
    { skipOverlapping: false },
  );
  const voxels = {};
  for (const labelmap of state.labelmapBufferArray) {
    for (const v of new Uint8Array(labelmap)) if (v) voxels[v] = (voxels[v] || 0) + 1;
  }
  const segments = list(state.segMetadata.data)
    .filter((s) => s)
    .map((s) => ({
      number: s.SegmentNumber,
      label: s.SegmentLabel,
      trackingUid: s.TrackingUID,
      category: code(s.SegmentedPropertyCategoryCodeSequence),
      type: code(s.SegmentedPropertyTypeCodeSequence),
      cielab: s.RecommendedDisplayCIELabValue ?? null,
    }));
  return { segments, voxels, overlapping: Boolean(state.overlappingSegments) };
}

const input = JSON.parse(readFileSync(process.argv[2], "utf8"));
const console_log = console.log;
console.log = console.info = console.debug = console.warn = () => {}; // the adapters log a lot
const result = {
  sr: readSr(input.sr),
  seg: input.seg ? await readSeg(input.seg, input.t2w) : null,
};
process.stdout.write(JSON.stringify(result) + "\n");
void console_log;
