// transceiver: the reference engine around kvx::transceiver::Transceiver.
//
//   transceiver demo         a context and a generation instance as two child
//                            processes on 127.0.0.1 (loopback: both in this one)
//   transceiver context      one side each, for two machines: the context side
//   transceiver generation   prints its control addresses; give them to the other
//   transceiver demo --soak  batch after batch on the same instances for --seconds,
//                            faults injected, resources watched (tools/transceiver_soak.h)
//
// Results go to stdout: a table, then one JSON document on the last line.
// Diagnostics and the progress line go to stderr. Exit status: 0 every byte right
// and no request failed but the cancelled (soak: every check passed); 1 a wrong
// byte, a late write or a failed request (soak: a failed check, a side gone); 2 a
// setup error (flags, processes, handshake); 3 (a child of `demo`) its parent went
// away. See tools/TRANSCEIVER.md.

#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "tools/transceiver_harness.h"
#include "tools/transceiver_soak.h"
#include "transfer/page_table.h"
#include "transfer/protocol.h"
#include "transfer/scenario.h"
#include "transfer/topology.h"

// The model.
ABSL_FLAG(int64_t, layers, 4, "model layers; layer l is in group l % (number of --windows)");
ABSL_FLAG(int64_t, kv_heads, 4, "KV heads of the model");
ABSL_FLAG(int64_t, head_size, 64, "elements per head");
ABSL_FLAG(int64_t, element_bytes, 2, "bytes per element (2: bf16)");
ABSL_FLAG(int64_t, tokens_per_block, 16, "tokens per KV block");
ABSL_FLAG(std::string, windows, "full,256",
          "one entry per layer group: 'full' or a sliding window in tokens");
ABSL_FLAG(bool, mla, false, "MLA: one latent per token, held whole by every TP rank");
// The instances.
ABSL_FLAG(int64_t, context_tp, 2, "context instance: tensor-parallel size");
ABSL_FLAG(int64_t, context_pp, 1, "context instance: pipeline-parallel size");
ABSL_FLAG(std::string, context_layers_per_pp, "",
          "context instance: layers of each PP stage, e.g. 3,1 (empty: even)");
ABSL_FLAG(bool, context_attention_dp, false, "context instance: attention data parallelism");
ABSL_FLAG(int64_t, generation_tp, 1, "generation instance: tensor-parallel size");
ABSL_FLAG(int64_t, generation_pp, 1, "generation instance: pipeline-parallel size");
ABSL_FLAG(std::string, generation_layers_per_pp, "",
          "generation instance: layers of each PP stage (empty: even)");
ABSL_FLAG(bool, generation_attention_dp, false,
          "generation instance: attention data parallelism");
ABSL_FLAG(std::string, context_name, "prefill", "the context instance's name");
ABSL_FLAG(std::string, generation_name, "decode", "the generation instance's name");
// The network.
ABSL_FLAG(std::string, transport, "tcp",
          "tcp (libfabric tcp;ofi_rxm), shm, loopback (one process), or a libfabric provider");
ABSL_FLAG(std::string, node, "127.0.0.1", "address the libfabric endpoints bind (not shm)");
ABSL_FLAG(std::string, control_host, "127.0.0.1",
          "address the control plane (ZeroMQ) binds, port chosen by the kernel");
ABSL_FLAG(std::string, curve_keys, "",
          "CurveZMQ on the control plane: a directory with NAME.secret and NAME.pub of this "
          "side (both sides for demo) and the .pub of every peer it accepts (kvx_keygen "
          "makes them; transfer/CONTROL_PLANE.md). Empty: off");
ABSL_FLAG(std::vector<std::string>, context_addresses, {},
          "generation: the context ranks' control addresses, in rank order, comma-separated");
// The workload.
ABSL_FLAG(int64_t, requests, 3000, "requests in the stream");
ABSL_FLAG(uint64_t, seed, 1, "the stream's seed; both sides must use the same");
ABSL_FLAG(uint64_t, first_rid, 1, "the first request id");
ABSL_FLAG(int64_t, min_prompt, 16, "shortest prompt, tokens");
ABSL_FLAG(int64_t, max_prompt, 4096, "longest prompt, tokens");
ABSL_FLAG(double, hit_rate, 0.5, "share of requests with a prefix-cache hit on the generation side");
ABSL_FLAG(double, chunk_rate, 0.2, "share of requests sent as several slices (chunked prefill)");
ABSL_FLAG(int64_t, max_chunks, 4, "most slices of a chunked request");
ABSL_FLAG(double, cancel_rate, 0.05,
          "share of requests cancelled (before, during or after, by either side)");
ABSL_FLAG(int64_t, concurrency, 8, "requests in flight per rank");
ABSL_FLAG(double, request_timeout_s, 60, "a request not final by then fails (DeadlineExceeded)");
ABSL_FLAG(double, run_timeout_s, 600, "the whole run's bound");
ABSL_FLAG(double, linger_s, 30,
          "context: keep answering the generation side this long after the stream ends");
ABSL_FLAG(bool, check_free_slots, true,
          "generation: check that freed slots stay untouched until reused");
ABSL_FLAG(bool, progress, true, "a progress line on stderr");
// Soak mode (TRANSCEIVER.md, "Soak").
ABSL_FLAG(bool, soak, false,
          "demo: run batch after batch on the same instances for --seconds, injecting faults "
          "and watching memory, file descriptors, registrations and sessions");
ABSL_FLAG(double, seconds, 60, "soak: no batch starts after this many seconds");
ABSL_FLAG(int64_t, soak_batch_requests, 300, "soak: requests per batch");
ABSL_FLAG(std::string, soak_faults, "write,delay,drop,reconnect",
          "soak: faults cycled through by every other batch (empty: none)");
ABSL_FLAG(int64_t, soak_fault_window, 8,
          "soak: delay and drop faults stay on until this many more requests per rank ended");
ABSL_FLAG(double, soak_request_timeout_s, 5,
          "soak: replaces --request_timeout_s (a delayed completion costs a batch this long)");
ABSL_FLAG(double, soak_warmup_s, 10, "soak: resources are compared with the first sample after this");
ABSL_FLAG(double, soak_report_interval_s, 10, "soak: a progress line on stderr this often");
ABSL_FLAG(int64_t, soak_rss_slack_mb, 64, "soak: RSS growth allowed per process, warm-up to end");
ABSL_FLAG(int64_t, soak_fd_slack, 8, "soak: open file descriptors' growth allowed per process");
ABSL_FLAG(int64_t, soak_thread_slack, 2, "soak: threads' growth allowed per process");
// Between `demo` and its children.
ABSL_FLAG(bool, json_only, false, "print only JSON lines on stdout (used by demo's children)");
ABSL_FLAG(bool, exit_on_stdin_eof, false,
          "exit when stdin closes (used by demo's children: they go when it goes)");

namespace kvx::harness {
namespace {

using nlohmann::json;

constexpr int kExitFailed = 1;
constexpr int kExitSetup = 2;

absl::StatusOr<std::vector<int64_t>> ParseList(absl::string_view name, absl::string_view text) {
  std::vector<int64_t> values;
  if (text.empty()) return values;
  for (absl::string_view item : absl::StrSplit(text, ',')) {
    int64_t v = 0;
    if (!absl::SimpleAtoi(item, &v)) {
      return absl::InvalidArgumentError(absl::StrCat("not a list of integers: --", name, "=", text));
    }
    values.push_back(v);
  }
  return values;
}

absl::StatusOr<RunOptions> OptionsFromFlags() {
  RunOptions o;
  o.model.num_layers = absl::GetFlag(FLAGS_layers);
  o.model.num_kv_heads = absl::GetFlag(FLAGS_kv_heads);
  o.model.head_size = absl::GetFlag(FLAGS_head_size);
  o.model.element_bytes = absl::GetFlag(FLAGS_element_bytes);
  o.model.tokens_per_block = absl::GetFlag(FLAGS_tokens_per_block);
  o.model.is_mla = absl::GetFlag(FLAGS_mla);
  o.model.windows.clear();
  for (absl::string_view w : absl::StrSplit(absl::GetFlag(FLAGS_windows), ',')) {
    int64_t window = 0;
    if (w == "full") {
      o.model.windows.push_back(std::nullopt);
    } else if (absl::SimpleAtoi(w, &window)) {
      o.model.windows.push_back(window);
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat("--windows takes 'full' or a token count per group: item=", w));
    }
  }
  o.context.tp = absl::GetFlag(FLAGS_context_tp);
  o.context.pp = absl::GetFlag(FLAGS_context_pp);
  o.context.attention_dp = absl::GetFlag(FLAGS_context_attention_dp);
  absl::StatusOr<std::vector<int64_t>> split =
      ParseList("context_layers_per_pp", absl::GetFlag(FLAGS_context_layers_per_pp));
  if (!split.ok()) return split.status();
  o.context.layers_per_pp = *split;
  o.generation.tp = absl::GetFlag(FLAGS_generation_tp);
  o.generation.pp = absl::GetFlag(FLAGS_generation_pp);
  o.generation.attention_dp = absl::GetFlag(FLAGS_generation_attention_dp);
  split = ParseList("generation_layers_per_pp", absl::GetFlag(FLAGS_generation_layers_per_pp));
  if (!split.ok()) return split.status();
  o.generation.layers_per_pp = *split;
  o.context_name = absl::GetFlag(FLAGS_context_name);
  o.generation_name = absl::GetFlag(FLAGS_generation_name);
  o.curve_keys = absl::GetFlag(FLAGS_curve_keys);
  o.transport.kind = absl::GetFlag(FLAGS_transport);
  o.transport.node = absl::GetFlag(FLAGS_node);
  o.workload.requests = absl::GetFlag(FLAGS_requests);
  o.workload.seed = absl::GetFlag(FLAGS_seed);
  o.workload.first_rid = absl::GetFlag(FLAGS_first_rid);
  o.workload.min_prompt = absl::GetFlag(FLAGS_min_prompt);
  o.workload.max_prompt = absl::GetFlag(FLAGS_max_prompt);
  o.workload.hit_rate = absl::GetFlag(FLAGS_hit_rate);
  o.workload.chunk_rate = absl::GetFlag(FLAGS_chunk_rate);
  o.workload.max_chunks = absl::GetFlag(FLAGS_max_chunks);
  o.workload.cancel_rate = absl::GetFlag(FLAGS_cancel_rate);
  o.concurrency = absl::GetFlag(FLAGS_concurrency);
  const double timeout = absl::GetFlag(FLAGS_request_timeout_s);
  const double run = absl::GetFlag(FLAGS_run_timeout_s);
  if (!(timeout > 0 && timeout < 1e6 && run > 0 && run < 1e7)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "timeouts must be positive: request_timeout_s=", timeout, " run_timeout_s=", run));
  }
  o.request_timeout = absl::Seconds(timeout);
  o.run_timeout = absl::Seconds(run);
  if (absl::GetFlag(FLAGS_soak)) {
    const double soak_timeout = absl::GetFlag(FLAGS_soak_request_timeout_s);
    if (!(soak_timeout > 0 && soak_timeout < 1e6)) {
      return absl::InvalidArgumentError(
          absl::StrCat("soak_request_timeout_s must be positive: soak_request_timeout_s=", soak_timeout));
    }
    o.request_timeout = absl::Seconds(soak_timeout);
  }
  o.check_free_slots = absl::GetFlag(FLAGS_check_free_slots);
  o.progress = absl::GetFlag(FLAGS_progress);
  // Bad shapes and models are refused here, before any process or socket.
  for (Role role : {Role::kContext, Role::kGeneration}) {
    absl::StatusOr<InstanceOptions> side = SideOptions(o, role);
    if (!side.ok()) return side.status();
    for (int64_t r = 0; r < side->shape.ranks(); ++r) {
      absl::StatusOr<transfer::Topology> t = RankTopology(side->shape, side->model.num_layers, r);
      if (!t.ok()) return t.status();
      // The head split and the layout, as each rank will build them.
      absl::StatusOr<transfer::RankPageTable> table =
          transfer::BuildStandardPageTable(side->model, *t, 1, 0x10000);
      if (!table.ok()) {
        return absl::Status(table.status().code(),
                            absl::StrCat(role == Role::kContext ? "context" : "generation",
                                         " instance: ", table.status().message()));
      }
    }
  }
  return o;
}

absl::StatusOr<SoakOptions> SoakOptionsFromFlags(const RunOptions& run) {
  SoakOptions soak;
  const std::pair<const char*, double> seconds[] = {
      {"seconds", absl::GetFlag(FLAGS_seconds)},
      {"soak_warmup_s", absl::GetFlag(FLAGS_soak_warmup_s)},
      {"soak_report_interval_s", absl::GetFlag(FLAGS_soak_report_interval_s)}};
  for (const auto& [name, value] : seconds) {
    if (!(value >= 0 && value < 1e7)) {
      return absl::InvalidArgumentError(absl::StrCat("out of [0, 1e7) seconds: ", name, "=", value));
    }
  }
  soak.duration = absl::Seconds(absl::GetFlag(FLAGS_seconds));
  soak.warmup = absl::Seconds(absl::GetFlag(FLAGS_soak_warmup_s));
  soak.report_interval = absl::Seconds(absl::GetFlag(FLAGS_soak_report_interval_s));
  soak.batch_timeout = run.run_timeout;
  soak.batch_requests = absl::GetFlag(FLAGS_soak_batch_requests);
  soak.fault_window = absl::GetFlag(FLAGS_soak_fault_window);
  soak.rss_slack_kb = absl::GetFlag(FLAGS_soak_rss_slack_mb) * 1024;
  soak.fd_slack = absl::GetFlag(FLAGS_soak_fd_slack);
  soak.thread_slack = absl::GetFlag(FLAGS_soak_thread_slack);
  if (soak.batch_requests < 1 || soak.batch_requests > (int64_t{1} << 20) || soak.fault_window < 0 ||
      soak.rss_slack_kb < 0 || soak.fd_slack < 0 || soak.thread_slack < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "soak sizes out of range: soak_batch_requests=", soak.batch_requests, " (1..2^20)",
        " soak_fault_window=", soak.fault_window, " slacks=", soak.rss_slack_kb, ",",
        soak.fd_slack, ",", soak.thread_slack, " (>= 0)"));
  }
  soak.faults.clear();
  for (absl::string_view name :
       absl::StrSplit(absl::GetFlag(FLAGS_soak_faults), ',', absl::SkipEmpty())) {
    absl::StatusOr<FaultKind> kind = ParseFaultKind(name);
    if (!kind.ok()) return kind.status();
    if (*kind != FaultKind::kNone) soak.faults.push_back(*kind);
  }
  return soak;
}

json Document(const std::string& command, const SideReport* context,
              const SideReport* generation, double seconds) {
  json doc = {{"command", command}, {"seconds", seconds}};
  bool ok = true;
  for (const auto& [name, side] : {std::pair<const char*, const SideReport*>{"context", context},
                                   {"generation", generation}}) {
    if (side == nullptr) continue;
    json j = ToJson(*side);
    j.erase("latency_ms");  // p50 and p99 stay; the raw samples are for the demo's parent
    doc[name] = std::move(j);
    ok &= side->ok();
  }
  doc["ok"] = ok;
  return doc;
}

void PrintLine(const json& j) {
  std::printf("%s\n", j.dump().c_str());
  std::fflush(stdout);
}

int ExitCode(bool ok) { return ok ? 0 : kExitFailed; }

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "transceiver: %s\n", status.ToString().c_str());
  return kExitSetup;
}

// `context` and `generation`: one side in this process.
int RunOneSide(const RunOptions& options, Role role) {
  const bool json_only = absl::GetFlag(FLAGS_json_only);
  std::atomic<bool> finished{false};
  if (absl::GetFlag(FLAGS_exit_on_stdin_eof)) ExitWhenClosed(STDIN_FILENO, &finished);
  SideHooks hooks;
  hooks.on_addresses = [&](const std::vector<std::string>& addresses) {
    PrintLine(json{{"control_addresses", addresses}});
    if (!json_only) {
      std::fprintf(stderr, "transceiver: context ranks up; on the generation machine run\n"
                           "  transceiver generation --context_addresses=%s <same flags>\n",
                   absl::StrJoin(addresses, ",").c_str());
    }
  };
  hooks.on_report = [&](const SideReport& report) {
    const bool context = role == Role::kContext;
    // Before the report goes out: the parent may close our stdin as soon as it has
    // read it, and that is then a clean end.
    finished.store(true);
    if (json_only) {
      PrintLine(ToJson(report));  // with the samples: the parent computes the table
    } else {
      SideReport none;
      none.instance = "-";
      std::printf("%s", FormatTable(context ? report : none, context ? none : report,
                                    report.seconds)
                            .c_str());
      PrintLine(Document(context ? "context" : "generation", context ? &report : nullptr,
                         context ? nullptr : &report, report.seconds));
    }
    if (absl::GetFlag(FLAGS_exit_on_stdin_eof)) {
      // The demo closes our stdin once the other side is done; until then the
      // ranks keep answering (a late request data gets its FAILED at once).
      for (;;) pause();
    }
    if (context) absl::SleepFor(absl::Seconds(absl::GetFlag(FLAGS_linger_s)));
  };
  absl::StatusOr<SideReport> report =
      RunSide(options, role, absl::GetFlag(FLAGS_context_addresses), hooks);
  if (!report.ok()) return Fail(report.status());
  return ExitCode(report->ok());
}

// `demo`'s two children: the context side, whose control addresses cross its
// stdout, then the generation side with them.
struct Children {
  std::unique_ptr<ChildProcess> context;
  std::unique_ptr<ChildProcess> generation;
};

absl::StatusOr<Children> StartChildren(const std::vector<std::string>& forwarded) {
  Children children;
  std::vector<std::string> context_args = {"context"};
  context_args.insert(context_args.end(), forwarded.begin(), forwarded.end());
  context_args.insert(context_args.end(), {"--json_only", "--exit_on_stdin_eof", "--progress=false"});
  absl::StatusOr<std::unique_ptr<ChildProcess>> context =
      ChildProcess::Spawn("/proc/self/exe", context_args);
  if (!context.ok()) return context.status();
  children.context = *std::move(context);
  absl::StatusOr<std::string> line = children.context->ReadLine(absl::Now() + absl::Seconds(60));
  if (!line.ok()) {
    return absl::Status(line.status().code(), absl::StrCat("context child: ", line.status().message()));
  }
  const json addresses = json::parse(*line, nullptr, /*allow_exceptions=*/false);
  if (!addresses.is_object() || !addresses.contains("control_addresses") ||
      !addresses["control_addresses"].is_array()) {
    return absl::InternalError(absl::StrCat("context child said: ", *line));
  }
  std::vector<std::string> list;
  for (const json& a : addresses["control_addresses"]) {
    if (!a.is_string()) return absl::InternalError("context child sent a bad address");
    list.push_back(a.get<std::string>());
  }
  std::vector<std::string> generation_args = {"generation"};
  generation_args.insert(generation_args.end(), forwarded.begin(), forwarded.end());
  generation_args.insert(generation_args.end(),
                         {"--json_only", "--exit_on_stdin_eof",
                          absl::StrCat("--context_addresses=", absl::StrJoin(list, ","))});
  absl::StatusOr<std::unique_ptr<ChildProcess>> generation =
      ChildProcess::Spawn("/proc/self/exe", generation_args);
  if (!generation.ok()) return generation.status();
  children.generation = *std::move(generation);
  return children;
}

// Closes the children's stdin (their cue to exit) and reaps them.
void EndChildren(Children& children) {
  for (ChildProcess* child : {children.context.get(), children.generation.get()}) {
    child->CloseStdin();
    absl::StatusOr<int> exit = child->Wait(absl::Now() + absl::Seconds(10));
    if (!exit.ok() || *exit != 0) {
      std::fprintf(stderr, "transceiver: a child did not exit cleanly: %s\n",
                   exit.ok() ? absl::StrCat("status=", *exit).c_str() : exit.status().ToString().c_str());
    }
  }
}

// `demo`: both sides; children over a network transport, this process over loopback.
int Demo(const RunOptions& options, const std::vector<std::string>& forwarded) {
  const absl::Time start = absl::Now();
  if (options.transport.kind == "loopback") {
    absl::StatusOr<RunReport> report = RunInProcess(options);
    if (!report.ok()) return Fail(report.status());
    std::printf("%s", FormatTable(report->context, report->generation, report->seconds).c_str());
    PrintLine(Document("demo", &report->context, &report->generation, report->seconds));
    return ExitCode(report->ok());
  }
  absl::StatusOr<Children> children = StartChildren(forwarded);
  if (!children.ok()) return Fail(children.status());
  const absl::Time deadline = start + options.run_timeout + absl::Seconds(60);
  std::optional<SideReport> reports[2];
  for (int i : {1, 0}) {  // generation first: the context side ends no later
    ChildProcess& child = i == 0 ? *children->context : *children->generation;
    absl::StatusOr<std::string> report_line = child.ReadLine(deadline);
    if (!report_line.ok()) {
      return Fail(absl::Status(report_line.status().code(),
                               absl::StrCat(i == 0 ? "context" : "generation", " child: ",
                                            report_line.status().message())));
    }
    absl::StatusOr<SideReport> report =
        SideReportFromJson(json::parse(*report_line, nullptr, false));
    if (!report.ok()) return Fail(report.status());
    reports[i] = *std::move(report);
  }
  EndChildren(*children);
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::printf("%s", FormatTable(*reports[0], *reports[1], seconds).c_str());
  PrintLine(Document("demo", &*reports[0], &*reports[1], seconds));
  return ExitCode(reports[0]->ok() && reports[1]->ok());
}

// `demo --soak`: both sides in this process over loopback, else the two children,
// which run `context --soak` and `generation --soak` (SoakChild).
int SoakDemo(const RunOptions& options, const SoakOptions& soak,
             const std::vector<std::string>& forwarded) {
  signal(SIGPIPE, SIG_IGN);  // a child gone is an error from WriteLine, not our end
  absl::StatusOr<SoakReport> report;
  if (options.transport.kind == "loopback") {
    absl::StatusOr<std::unique_ptr<SoakSide>> context = SoakSide::Create(options, Role::kContext, soak);
    if (!context.ok()) return Fail(context.status());
    absl::StatusOr<std::unique_ptr<SoakSide>> generation =
        SoakSide::Create(options, Role::kGeneration, soak);
    if (!generation.ok()) return Fail(generation.status());
    const absl::Time deadline = absl::Now() + absl::Seconds(60);
    absl::Status connected = (*generation)->Connect((*context)->control_addresses(), deadline);
    if (connected.ok()) connected = (*context)->Connect({}, deadline);
    if (!connected.ok()) return Fail(connected);
    InProcessSoakLink context_link(context->get());
    InProcessSoakLink generation_link(generation->get());
    report = RunSoak(options, soak, context_link, generation_link);
  } else {
    absl::StatusOr<Children> children = StartChildren(forwarded);
    if (!children.ok()) return Fail(children.status());
    ChildSoakLink context_link(children->context.get());
    ChildSoakLink generation_link(children->generation.get());
    report = RunSoak(options, soak, context_link, generation_link);
    if (report.ok()) EndChildren(*children);
  }
  if (!report.ok()) {
    // Set up, then a side that went away or could not run a batch: a failure found.
    std::fprintf(stderr, "transceiver: the soak stopped: %s\n", report.status().ToString().c_str());
    return kExitFailed;
  }
  std::printf("%s", FormatSoakTable(*report).c_str());
  PrintLine(ToJson(*report));
  return ExitCode(report->ok());
}

// `context --soak` and `generation --soak`: one side of demo's soak, which sends
// commands (JSON lines) on stdin; each answer is a JSON line on stdout.
int SoakChild(const RunOptions& options, const SoakOptions& soak, Role role) {
  static std::atomic<bool> finished{false};
  static LineQueue* const commands = new LineQueue();  // the stdin reader's, for good
  ExitWhenClosed(STDIN_FILENO, &finished,
                 [](std::string line) { commands->Push(std::move(line)); });
  absl::StatusOr<std::unique_ptr<SoakSide>> side = SoakSide::Create(options, role, soak);
  if (!side.ok()) return Fail(side.status());
  if (role == Role::kContext) PrintLine(json{{"control_addresses", (*side)->control_addresses()}});
  absl::Status connected = (*side)->Connect(absl::GetFlag(FLAGS_context_addresses),
                                            absl::Now() + absl::Seconds(60));
  if (!connected.ok()) {
    PrintLine(json{{"error", connected.ToString()}});
    return Fail(connected);
  }
  for (;;) {
    finished.store(true);  // between commands, a closed stdin is the end
    std::optional<std::string> line =
        commands->Pop(absl::Now() + 2 * soak.batch_timeout + absl::Minutes(2));
    if (!line.has_value()) {
      return Fail(absl::DeadlineExceededError("soak: no command from the demo in time"));
    }
    finished.store(false);
    const json answer = (*side)->Execute(json::parse(*line, nullptr, /*allow_exceptions=*/false));
    finished.store(true);
    PrintLine(answer);
  }
}

}  // namespace
}  // namespace kvx::harness

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Moves KV cache from a context to a generation instance through kvx's Transceiver "
      "and checks every byte.\n"
      "  bazel run //tools:transceiver -- demo\n"
      "  bazel run //tools:transceiver -- demo --transport=loopback --context_tp=4 "
      "--generation_tp=2 --requests=500\n"
      "  bazel run //tools:transceiver -- context --node=HOST_A --control_host=HOST_A  "
      "(then on the other machine: generation --context_addresses=...)");
  std::vector<char*> positional = absl::ParseCommandLine(argc, argv);
  const std::string command = positional.size() >= 2 ? positional[1] : "";
  if (positional.size() != 2 ||
      (command != "demo" && command != "context" && command != "generation")) {
    std::fprintf(stderr, "usage: transceiver demo|context|generation [--flags]; --help lists them\n");
    return 2;
  }
  absl::StatusOr<kvx::harness::RunOptions> options = kvx::harness::OptionsFromFlags();
  if (!options.ok()) return kvx::harness::Fail(options.status());
  std::optional<kvx::harness::SoakOptions> soak;
  if (absl::GetFlag(FLAGS_soak)) {
    absl::StatusOr<kvx::harness::SoakOptions> parsed = kvx::harness::SoakOptionsFromFlags(*options);
    if (!parsed.ok()) return kvx::harness::Fail(parsed.status());
    soak = *std::move(parsed);
  }
  if (command == "demo") {
    // The children get our flags as they were given; the command word goes.
    std::vector<std::string> forwarded;
    bool dropped = false;
    for (int i = 1; i < argc; ++i) {
      if (!dropped && command == argv[i]) {
        dropped = true;
        continue;
      }
      forwarded.push_back(argv[i]);
    }
    return soak.has_value() ? kvx::harness::SoakDemo(*options, *soak, forwarded)
                            : kvx::harness::Demo(*options, forwarded);
  }
  if (options->transport.kind == "loopback") {
    return kvx::harness::Fail(absl::InvalidArgumentError(
        "--transport=loopback works only inside one process: use it with `demo`"));
  }
  const kvx::transfer::Role role =
      command == "context" ? kvx::transfer::Role::kContext : kvx::transfer::Role::kGeneration;
  if (role == kvx::transfer::Role::kGeneration && absl::GetFlag(FLAGS_context_addresses).empty()) {
    return kvx::harness::Fail(absl::InvalidArgumentError(
        "generation needs --context_addresses (printed by `transceiver context`)"));
  }
  return soak.has_value() ? kvx::harness::SoakChild(*options, *soak, role)
                          : kvx::harness::RunOneSide(*options, role);
}
