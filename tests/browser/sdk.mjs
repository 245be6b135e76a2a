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
  // The Responses API and stored objects, as the SDK's resources call them.
  const m = await client.models.retrieve(model);
  if (m.id !== model) fail(`models.retrieve: ${JSON.stringify(m)}`);
  const r = await client.responses.create({ model, input: "hello" });
  const again = await client.responses.retrieve(r.id);
  if (again.id !== r.id || !again.output_text) fail(`responses.retrieve: ${JSON.stringify(again)}`);
  const next = await client.responses.create({ model, input: "more", previous_response_id: r.id });
  const items = await client.responses.inputItems.list(next.id);
  if (items.data.length !== 1) fail(`responses.inputItems.list: ${JSON.stringify(items.data)}`);
  const cancelled = await client.responses.cancel(next.id);
  if (cancelled.status !== "cancelled") fail(`responses.cancel: ${cancelled.status}`);
  await client.responses.delete(r.id);
  try {
    await client.responses.retrieve(r.id);
    fail("a deleted response was found");
  } catch (e) {
    if (!(e instanceof OpenAI.NotFoundError)) fail(`deleted response: ${e}`);
  }
  const streamed = await client.responses.stream({ model, input: "s" }).finalResponse();
  if ((await client.responses.retrieve(streamed.id)).id !== streamed.id) fail("streamed response not stored");
  console.log(`responses: create, retrieve, previous_response_id, input items, cancel, delete, stream`);

  const c = await client.chat.completions.create({ model, store: true, metadata: { n: "1" }, messages: [{ role: "user", content: "hi" }] });
  const got = await client.chat.completions.retrieve(c.id);
  if (got.id !== c.id) fail(`chat.completions.retrieve: ${JSON.stringify(got)}`);
  const upd = await client.chat.completions.update(c.id, { metadata: { n: "2" } });
  if (upd.metadata.n !== "2") fail(`chat.completions.update: ${JSON.stringify(upd)}`);
  const msgs = await client.chat.completions.messages.list(c.id);
  if (msgs.data.length !== 1) fail(`chat.completions.messages.list: ${JSON.stringify(msgs.data)}`);
  const listed = [];
  for await (const item of client.chat.completions.list({ limit: 1 })) listed.push(item.id);
  if (!listed.includes(c.id)) fail(`chat.completions.list: ${JSON.stringify(listed)}`);
  const del = await client.chat.completions.delete(c.id);
  if (!del.deleted) fail(`chat.completions.delete: ${JSON.stringify(del)}`);
  console.log(`stored completions: retrieve, update, messages, list (${listed.length}), delete`);
  console.log("OK");
} catch (e) {
  fail(e.stack || String(e));
}
