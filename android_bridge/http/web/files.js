// What kind of file the user gave, checked from its first bytes (not its name), and its
// pixel size where the header says it cheaply: so a wrong or huge file is refused before it
// is uploaded, decoded or sent to a model. The runtime checks everything again.

const HEAD_BYTES = 256 * 1024;

export async function sniff(file) {
  const head = new Uint8Array(await file.slice(0, HEAD_BYTES).arrayBuffer());
  const at = (i, bytes) => bytes.every((b, k) => head[i + k] === b);
  if (at(0, [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])) return { kind: "PNG", ...pngSize(head) };
  if (at(0, [0xff, 0xd8, 0xff])) return { kind: "JPEG", ...jpegSize(head) };
  if (at(128, [0x44, 0x49, 0x43, 0x4d])) return { kind: "DICOM" };
  // Other formats Pillow reads on the runtime (not advertised, but not refused either).
  if (at(0, [0x47, 0x49, 0x46, 0x38])) return { kind: "GIF" };
  if (at(0, [0x42, 0x4d])) return { kind: "BMP" };
  if (at(0, [0x49, 0x49, 0x2a, 0x00]) || at(0, [0x4d, 0x4d, 0x00, 0x2a])) return { kind: "TIFF" };
  if (at(0, [0x52, 0x49, 0x46, 0x46]) && at(8, [0x57, 0x45, 0x42, 0x50])) return { kind: "WebP" };
  return { kind: null };
}

function u32(b, i) {
  return ((b[i] << 24) | (b[i + 1] << 16) | (b[i + 2] << 8) | b[i + 3]) >>> 0;
}

function pngSize(b) {
  return b.length >= 24 ? { width: u32(b, 16), height: u32(b, 20) } : {};
}

// Walk the JPEG markers to the first start-of-frame (SOF0..SOF15 but DHT, JPG, DAC).
function jpegSize(b) {
  let i = 2;
  while (i + 9 < b.length) {
    if (b[i] !== 0xff) {
      i += 1;
      continue;
    }
    const marker = b[i + 1];
    if (marker === 0xff || marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) {
      i += marker === 0xff ? 1 : 2;
      continue;
    }
    const len = (b[i + 2] << 8) | b[i + 3];
    if (marker >= 0xc0 && marker <= 0xcf && ![0xc4, 0xc8, 0xcc].includes(marker)) {
      return { height: (b[i + 5] << 8) | b[i + 6], width: (b[i + 7] << 8) | b[i + 8] };
    }
    i += 2 + len;
  }
  return {};
}

// The file as base64 (what /v1/rpc takes), without the data-URL prefix.
export function base64Of(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).slice(String(reader.result).indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

export function megabytes(n) {
  return `${(n / 1048576).toFixed(n < 10 * 1048576 ? 1 : 0)} MB`;
}

// Why this file can't be used, or null when it may be sent to the runtime.
export function refusal(file, info, limits) {
  const name = `“${file.name || "the file"}”`;
  if (file.size === 0) return `${name} is empty.`;
  if (!info.kind) {
    return `${name} is not an image this page can use: its content is not PNG, JPEG or DICOM, whatever its name says. Choose an image file.`;
  }
  if (limits && file.size > limits.max_upload_bytes) {
    return `${name} is ${megabytes(file.size)}; this runtime takes images up to ${megabytes(limits.max_upload_bytes)}. Use a smaller or downscaled copy.`;
  }
  if (limits && info.width && info.height && info.width * info.height > limits.max_image_pixels) {
    const mp = (n) => `${Math.round(n / 1e6)} megapixels`;
    return `${name} is ${info.width} × ${info.height} pixels (${mp(info.width * info.height)}); this runtime takes at most ${mp(limits.max_image_pixels)} per image. Downscale it and try again.`;
  }
  return null;
}
