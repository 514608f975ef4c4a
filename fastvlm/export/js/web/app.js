// FastVLM in the browser with transformers.js: everything is served from this folder (no CDN),
// WebGPU when the browser has it, else WASM. Greedy decoding, streamed with tokens/s.
import {
  env, AutoProcessor, AutoModelForImageTextToText, RawImage, TextStreamer,
} from './vendor/transformers.min.js';

const here = (p) => new URL(p, location.href).href;
env.allowRemoteModels = false; // local files only
env.allowLocalModels = true;
env.useBrowserCache = false;
// a path, not a URL: transformers.js only probes local files (tokenizer_config.json) by path
env.localModelPath = new URL('./', location.href).pathname;
env.backends.onnx.wasm.wasmPaths = {
  mjs: here('./vendor/ort-wasm-simd-threaded.asyncify.mjs'),
  wasm: here('./vendor/ort-wasm-simd-threaded.asyncify.wasm'),
};

// Apple's pad-to-square (fastvlm's own framing): centre the image on a square of the mean colour
// before the processor's resize, which transformers.js cannot do from a config file.
function padToSquare(img, mean) {
  img = img.rgb();
  const { width: w, height: h } = img;
  if (w === h) return img;
  const s = Math.max(w, h), left = Math.floor((s - w) / 2), top = Math.floor((s - h) / 2);
  const data = new Uint8ClampedArray(s * s * 3);
  const bg = mean.map((m) => Math.trunc(m * 255));
  for (let i = 0; i < s * s; ++i) data.set(bg, i * 3);
  for (let y = 0; y < h; ++y) {
    data.set(img.data.subarray(y * w * 3, (y + 1) * w * 3), ((y + top) * s + left) * 3);
  }
  return new RawImage(data, s, s, 3);
}

const $ = (id) => document.getElementById(id);
let processor, model, image;

async function loadModel() {
  processor = await AutoProcessor.from_pretrained('model');
  const devices = [];
  if (navigator.gpu && (await navigator.gpu.requestAdapter().catch(() => null))) devices.push('webgpu');
  devices.push('wasm');
  for (const device of devices) {
    try {
      model = await AutoModelForImageTextToText.from_pretrained('model', { device });
      $('device').textContent = `(${device})`;
      window.fastvlmDevice = device;
      return;
    } catch (e) {
      console.warn(`${device} failed, trying the next backend`, e);
    }
  }
  throw new Error('no backend could load the model');
}

async function ask() {
  if (!image) { $('status').textContent = 'pick an image first'; return; }
  $('ask').disabled = true;
  $('answer').textContent = '';
  $('stats').textContent = '';
  const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: $('prompt').value }] }];
  const text = processor.apply_chat_template(messages, { add_generation_prompt: true });
  const inputs = await processor(image, text);
  let n = 0, t1 = 0;
  const t0 = performance.now();
  const streamer = new TextStreamer(processor.tokenizer, {
    skip_prompt: true,
    skip_special_tokens: true,
    callback_function: (s) => { $('answer').textContent += s; },
    token_callback_function: () => { if (n++ === 0) t1 = performance.now(); },
  });
  await model.generate({
    ...inputs, max_new_tokens: Number($('max_tokens').value), do_sample: false, streamer,
  });
  const t2 = performance.now();
  const tps = n > 1 ? ((n - 1) * 1000) / (t2 - t1) : 0;
  $('stats').textContent =
    `${n} tokens, first token ${((t1 - t0) / 1000).toFixed(2)} s, ${tps.toFixed(1)} tokens/s`;
  $('ask').disabled = false;
  window.fastvlmDone = ($('answer').textContent);
}

$('file').addEventListener('change', async (ev) => {
  const file = ev.target.files[0];
  if (!file) return;
  $('preview').src = URL.createObjectURL(file);
  const mean = processor?.image_processor.config.image_mean ?? [0, 0, 0];
  image = padToSquare(await RawImage.fromBlob(file), mean);
});
$('ask').addEventListener('click', () => ask().catch((e) => {
  $('status').textContent = `error: ${e.message ?? e}`;
  $('ask').disabled = false;
}));

loadModel().then(() => {
  $('status').textContent = 'ready';
  $('ask').disabled = false;
}).catch((e) => { $('status').textContent = `error: ${e.message ?? e}`; });
