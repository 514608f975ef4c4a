// Greedy generation with transformers.js on a local `fastvlm export onnx` folder (Node).
// usage: node generate.mjs MODEL_DIR MAX_NEW_TOKENS PROMPT IMAGE [IMAGE ...]
// prints one JSON line per image: {image, prompt_ids, tokens, text} (+ pixels with
// FASTVLM_DUMP_PIXELS=1, the processor's pixel_values, for framing checks)
import path from 'node:path';
import { env, AutoProcessor, AutoModelForImageTextToText, RawImage } from '@huggingface/transformers';

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

const [dir, maxNew, prompt, ...images] = process.argv.slice(2);
env.allowRemoteModels = false; // local files only: nothing may be fetched
env.allowLocalModels = true;
env.localModelPath = path.dirname(path.resolve(dir)) + path.sep;
const id = path.basename(path.resolve(dir));

const processor = await AutoProcessor.from_pretrained(id);
const model = await AutoModelForImageTextToText.from_pretrained(id, { device: 'cpu' });
const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: prompt }] }];
const text = processor.apply_chat_template(messages, { add_generation_prompt: true });
for (const file of images) {
    const mean = processor.image_processor.config.image_mean ?? [0, 0, 0];
    const image = padToSquare(await RawImage.read(file), mean);
    const inputs = await processor(image, text);
    const out = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
    const n = inputs.input_ids.dims.at(-1);
    const tokens = Array.from(out.tolist()[0].slice(n), Number);
    const prompt_ids = Array.from(inputs.input_ids.tolist()[0], Number);
    const decoded = processor.batch_decode(out.slice(null, [n, null]), { skip_special_tokens: true })[0];
    const row = { image: file, prompt_ids, tokens, text: decoded };
    if (process.env.FASTVLM_DUMP_PIXELS) row.pixels = Array.from(inputs.pixel_values.data);
    console.log(JSON.stringify(row));
}
await model.dispose();
