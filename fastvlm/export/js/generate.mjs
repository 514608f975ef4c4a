// Greedy generation with transformers.js on a local `fastvlm export onnx` folder (Node).
// usage: node generate.mjs MODEL_DIR MAX_NEW_TOKENS PROMPT IMAGE [IMAGE ...]
// prints one JSON line per image: {image, prompt_ids, tokens, text}
import path from 'node:path';
import { env, AutoProcessor, AutoModelForImageTextToText, RawImage } from '@huggingface/transformers';

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
    const image = await RawImage.read(file);
    const inputs = await processor(image, text);
    const out = await model.generate({ ...inputs, max_new_tokens: Number(maxNew), do_sample: false });
    const n = inputs.input_ids.dims.at(-1);
    const tokens = Array.from(out.tolist()[0].slice(n), Number);
    const prompt_ids = Array.from(inputs.input_ids.tolist()[0], Number);
    const decoded = processor.batch_decode(out.slice(null, [n, null]), { skip_special_tokens: true })[0];
    console.log(JSON.stringify({ image: file, prompt_ids, tokens, text: decoded }));
}
await model.dispose();
