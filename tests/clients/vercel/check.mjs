// The Vercel AI SDK against vlchat: node check.mjs <vlchat /v1 URL> <tool-calling /v1 URL> <png file>.
// Prints one JSON object with what each call gave; tests/test_api_vercel.py checks it.
import fs from 'fs';
import { createOpenAI } from '@ai-sdk/openai';
import { generateText, jsonSchema, streamText, tool } from 'ai';

const [base, toolBase, pngPath] = process.argv.slice(2);
const out = {};
const openai = createOpenAI({ baseURL: base, apiKey: 'vk1' });
const image = fs.readFileSync(pngPath);
const messages = [{ role: 'user', content: [{ type: 'text', text: 'What is this?' },
                                            { type: 'image', image, mediaType: 'image/png' }] }];
const weather = tool({ description: 'Weather in a city',
                       inputSchema: jsonSchema({ type: 'object', properties: { city: { type: 'string' } } }) });

// openai('model') is the Responses API (POST /v1/responses) in this SDK.
const g = await generateText({ model: openai('vlchat'), messages, maxOutputTokens: 12, temperature: 0 });
out.generate = { text: g.text, finish: g.finishReason, usage: g.usage.raw };
const s = streamText({ model: openai('vlchat'), messages, maxOutputTokens: 12, temperature: 0,
                       onError: ({ error }) => { out.streamError = String(error); } });
let streamed = '';
for await (const piece of s.textStream) streamed += piece;
out.stream = { text: streamed, finish: await s.finishReason, usage: (await s.usage).raw };
const t = await generateText({ model: openai('vlchat'), prompt: 'Weather in Paris?', maxOutputTokens: 6,
                               tools: { weather } });
out.toolsOffered = { text: t.text, finish: t.finishReason };
const c = await generateText({ model: openai.chat('vlchat'), messages, maxOutputTokens: 12, temperature: 0 });
out.chat = { text: c.text, finish: c.finishReason };

// A server (vlchat's own Responses code with a scripted answer) whose model calls a tool.
const scripted = createOpenAI({ baseURL: toolBase, apiKey: 'x' });
const tg = await generateText({ model: scripted('vlchat'), prompt: 'Weather in Paris?', tools: { weather } });
out.toolCall = { text: tg.text, finish: tg.finishReason, calls: tg.toolCalls.map((x) => [x.toolName, x.input]) };
const ts = streamText({ model: scripted('vlchat'), prompt: 'Weather in Paris?', tools: { weather },
                        onError: ({ error }) => { out.toolStreamError = String(error); } });
const kinds = [];
for await (const part of ts.fullStream) kinds.push(part.type);
out.toolCallStream = { text: await ts.text, finish: await ts.finishReason, kinds,
                       calls: (await ts.toolCalls).map((x) => [x.toolName, x.input]) };
console.log(JSON.stringify(out));
