// Calls the service from Node.js, straight from the .proto files (no generated code), as a
// TypeScript or JavaScript backend would: create, add, classify, a failing call whose
// google.rpc.ErrorInfo it decodes, and paged lists. Prints what it saw as one JSON object.
//
// Usage: node interop.mjs <host:port> <repository root>
import path from "node:path";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

const [address, root] = process.argv.slice(2);
const includeDirs = [path.join(root, "proto"), path.join(root, "third_party", "googleapis")];

const definition = protoLoader.loadSync("knn_classifier/v1/classifier.proto", {
  includeDirs,
  keepCase: true,
  longs: Number,
  enums: String,
  defaults: true,
  oneofs: true,
});
const { ClassifierService } = grpc.loadPackageDefinition(definition).knn_classifier.v1;
const client = new ClassifierService(address, grpc.credentials.createInsecure());

// google.rpc.Status and its details, to decode the grpc-status-details-bin trailer.
const rpc = new protobuf.Root();
rpc.resolvePath = (origin, target) =>
  target.startsWith("google/rpc/") ? path.join(includeDirs[1], target) : target;
rpc.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
const Status = rpc.lookupType("google.rpc.Status");

function details(error) {
  const [bytes] = error.metadata.get("grpc-status-details-bin");
  const status = Status.decode(bytes);
  return status.details.map((any) => {
    const type = any.type_url.split("/").pop();
    return { type, ...rpc.lookupType(type).toObject(rpc.lookupType(type).decode(any.value)) };
  });
}

function call(method, request) {
  return new Promise((resolve, reject) =>
    client[method](request, { deadline: Date.now() + 30_000 }, (error, response) =>
      error ? reject(error) : resolve(response),
    ),
  );
}

async function failure(method, request) {
  try {
    await call(method, request);
  } catch (error) {
    return { code: grpc.status[error.code], details: details(error) };
  }
  throw new Error(`${method} should have failed`);
}

async function pages(method, request, field) {
  const seen = [];
  let page_token = "";
  let count = 0;
  do {
    const response = await call(method, { ...request, page_token });
    seen.push(...response[field]);
    page_token = response.next_page_token;
    count += 1;
  } while (page_token);
  return { pages: count, items: seen };
}

const name = "from_node";
const created = await call("CreateClassifier", { name, k: 3, voting: "VOTING_MAJORITY" });
const added = await call("AddExemplars", {
  classifier: name,
  exemplars: [
    { text: "my card has not arrived", label: "card" },
    { text: "where is my new card", label: "card" },
    { text: "card still not delivered", label: "card" },
    { text: "how do I top up", label: "top_up" },
    { text: "top up by bank transfer", label: "top_up" },
  ],
});
const classified = await call("Classify", { classifier: name, text: "my card is not here" });
const batch = await call("ClassifyBatch", { classifier: name, texts: ["top up please", ""] });
const exemplars = await pages("ListExemplars", { classifier: name, page_size: 2 }, "exemplars");
await call("CreateClassifier", { name: "from_node_2" });
const classifiers = await pages("ListClassifiers", { page_size: 1 }, "classifiers");
const info = await call("GetServiceInfo", {});
const notFound = await failure("GetClassifier", { name: "no_such_classifier" });
const badAdd = await failure("AddExemplars", {
  classifier: name,
  exemplars: [
    { text: "fine", label: "x" },
    { text: "", label: "x" },
  ],
});
client.close();

console.log(
  JSON.stringify({
    created: { name: created.name, k: created.k, voting: created.voting },
    added: added.ids.length,
    classified: { label: classified.prediction.label, scores: classified.prediction.scores },
    batch: batch.results.map((r) =>
      r.result === "prediction" ? { label: r.prediction.label } : { error: r.error.message },
    ),
    exemplars: { pages: exemplars.pages, texts: exemplars.items.map((e) => e.text) },
    classifiers: { pages: classifiers.pages, names: classifiers.items.map((c) => c.name) },
    info: { api_version: info.api_version, dimensions: info.dimensions, model: info.embedder.model },
    notFound,
    badAdd,
  }),
);
