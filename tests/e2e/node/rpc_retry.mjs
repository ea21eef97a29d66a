// A Node service on plain NATS request/reply (the npm `nats` package), built from the README's
// wire contract only: send Job JSON to <prefix>.rpc.<tier>, read Result JSON from the reply.
// argv: NATS URL, scenario ("retry" | "no_dispatcher"); prints one JSON line.
import { connect, StringCodec } from "nats";

const [url, scenario] = process.argv.slice(2);
const sc = StringCodec();
const nc = await connect({ servers: url });
const job = (id, sleepMs) => sc.encode(JSON.stringify({
  id, request: { method: "POST", path: "/v1/chat/completions",
                 json: { model: "m", messages: [], mock: { sleep_ms: sleepMs } } } }));
const ask = (payload, timeout) => nc.request("ratefleet.rpc.vip", payload, { timeout })
  .then((m) => ({ at: Date.now(), result: JSON.parse(sc.decode(m.data)) }), (e) => ({ at: Date.now(), error: e.code }));

let out;
if (scenario === "retry") {
  // the first request gives up at 1 s (a client-side timeout); the service retries with the same id
  const payload = job("node-retry-1", 3000);
  const t0 = Date.now();
  const first = await ask(payload, 1000);
  const retry = await ask(payload, 20000);
  out = { first_error: first.error ?? null, retry_status: retry.result?.status ?? retry.error,
          retry_job_id: retry.result?.job_id ?? null, retry_at_ms: retry.at - t0 };
} else {
  const t0 = Date.now();
  const r = await ask(job("node-nodisp-1", 0), 5000);
  out = { error: r.error ?? null, ms: r.at - t0 };
}
console.log(JSON.stringify(out));
await nc.close();
