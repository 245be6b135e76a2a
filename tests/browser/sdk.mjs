// The official OpenAI Node SDK against the gateway (in front of the
// simulated upstream): its helpers must work, as they do against a provider.
//
// usage: node sdk.mjs <base-url/v1> <model>
import OpenAI from "openai";

const [baseURL, model] = process.argv.slice(2);
const fail = (msg) => { console.error(`FAIL: ${msg}`); process.exit(1); };
const client = new OpenAI({ baseURL, apiKey: "unused-on-loopback", maxRetries: 0, timeout: 10000 });
try {
  // The .stream() helper needs the role in the first delta.
  const stream = client.chat.completions.stream({ model, messages: [{ role: "user", content: "hi" }] });
  const done = await stream.finalChatCompletion();
  const text = done.choices[0].message.content;
  if (done.choices[0].message.role !== "assistant" || !text) fail(`stream helper: ${JSON.stringify(done)}`);
  console.log(`stream helper: ${JSON.stringify(text)}`);

  // The SDK asks for base64 and decodes it: one vector per input.
  const emb = await client.embeddings.create({ model, input: ["a", "b", "c"] });
  const dims = emb.data.map((d) => d.embedding.length);
  if (emb.data.length !== 3 || dims.some((n) => n === 0)) fail(`embeddings: ${JSON.stringify(dims)}`);
  console.log(`embeddings: ${emb.data.length} vectors of ${dims[0]}`);

  // A malformed request is the provider's 400, passed back as such.
  try {
    await client.chat.completions.create({ model, messages: [{ role: "wizard", content: "hi" }] });
    fail("a malformed request was answered 200");
  } catch (e) {
    if (!(e instanceof OpenAI.BadRequestError)) fail(`malformed: ${e}`);
    console.log(`malformed: 400 ${e.message}`);
  }
  console.log("OK");
} catch (e) {
  fail(e.stack || String(e));
}
