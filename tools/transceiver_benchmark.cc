// The Transceiver's speed, end to end, next to what lies under it, in one run:
//
//   bandwidth  one large request at a time (TP1 -> TP1, every block moves), from the
//              generation side's call to its final status, beside //transport:bench's
//              figure for the same provider and size (run as a child, now, on this
//              machine as loaded as it is);
//   overhead   a one-block request, one at a time: the generation side's latency and
//              the context side's plan, post and transfer times, beside a raw
//              ZeroMQ round trip between two control channels;
//   rate       many one-block requests, `--window` of them in flight: requests/s.
//
//   bazel run -c opt //tools:transceiver_benchmark
//   bazel run -c opt //tools:transceiver_benchmark -- --transport=shm --verify
//   bazel run -c opt //tools:transceiver_benchmark -- --sizes=268435456 --iters=10
//
// Fixed columns (fabtests' show_perf), the machine's load average before and
// after, then one JSON document on the last line. Both instances run in this
// process (the transport between them is real: libfabric on 127.0.0.1).
// Diagnostics on stderr; exit 1 with the status on error.

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "tools/transceiver_harness.h"
#include "transfer/control_channel.h"
#include "transfer/scenario.h"
#include "transfer/transceiver/transceiver.h"

ABSL_FLAG(std::string, transport, "tcp", "tcp (tcp;ofi_rxm), shm or loopback");
ABSL_FLAG(std::string, sizes, "67108864,268435456", "bytes of KV per large request");
ABSL_FLAG(int64_t, iters, 10, "large requests per size (after one warm-up)");
ABSL_FLAG(int64_t, overhead_requests, 2000, "one-block requests, one at a time");
ABSL_FLAG(int64_t, rate_requests, 5000, "one-block requests for the rate");
ABSL_FLAG(int64_t, window, 64, "one-block requests in flight for the rate");
ABSL_FLAG(int64_t, idle_poll_us, 0,
          "libfabric endpoints' sleep when idle (0 spins, as //transport:bench does)");
ABSL_FLAG(bool, verify, false, "fill every large request's KV and check every byte received");
ABSL_FLAG(bool, transport_bench, true, "run //transport:bench for the same sizes");
ABSL_FLAG(std::string, transport_bench_path, "",
          "the //transport:bench binary (default: from this binary's runfiles)");

namespace kvx::harness {
namespace {

using nlohmann::json;
using transceiver::RequestStatus;
using transfer::SessionState;

std::string LoadAverage() {
  std::ifstream in("/proc/loadavg");
  std::string one, five, fifteen;
  in >> one >> five >> fifteen;
  return absl::StrCat(one, " ", five, " ", fifteen);
}

// One context rank and one generation rank in this process, TP1 -> TP1.
struct Ranks {
  std::unique_ptr<Rank> context;
  std::unique_ptr<Rank> generation;
  transfer::ModelSpec model;
};

absl::StatusOr<Ranks> MakeRanks(const ModelOptions& model_options, int64_t slots) {
  Ranks ranks;
  absl::StatusOr<transfer::ModelSpec> model = BuildModel(model_options);
  if (!model.ok()) return model.status();
  ranks.model = *model;
  for (Role role : {Role::kContext, Role::kGeneration}) {
    InstanceOptions options;
    options.role = role;
    options.name = role == Role::kContext ? "prefill" : "decode";
    options.model = *model;
    options.transport.kind = absl::GetFlag(FLAGS_transport);
    options.transport.idle_poll_interval = absl::Microseconds(absl::GetFlag(FLAGS_idle_poll_us));
    options.check_free_slots = false;  // not timed, and not what is measured
    options.request_timeout = absl::Minutes(5);
    absl::StatusOr<std::unique_ptr<Rank>> rank = Rank::Create(options, 0, slots);
    if (!rank.ok()) return rank.status();
    (role == Role::kContext ? ranks.context : ranks.generation) = *std::move(rank);
  }
  absl::Status added = ranks.generation->transceiver().AddPeerInstance(
      {ranks.context->transceiver().control_address()}, absl::Now() + absl::Seconds(30));
  if (!added.ok()) return added;
  return ranks;
}

// Takes `blocks` slots on both sides for `rid` (one group).
absl::Status Allocate(Ranks& ranks, uint64_t rid, int64_t blocks) {
  for (Rank* rank : {ranks.context.get(), ranks.generation.get()}) {
    absl::StatusOr<std::vector<transfer::BlockList>> tables =
        rank->manager().Allocate(rid, 0, {DemoCacheManager::GroupNeed{blocks, 0}});
    if (!tables.ok()) return tables.status();
  }
  return absl::OkStatus();
}

absl::Status Post(Ranks& ranks, uint64_t rid, int64_t prompt_len) {
  transceiver::ContextRequest send;
  send.unique_rid = rid;
  send.prompt_len = prompt_len;
  if (absl::Status s = ranks.context->transceiver().RespondAndSendAsync(send); !s.ok()) return s;
  transceiver::GenerationRequest receive;
  receive.unique_rid = rid;
  receive.prompt_len = prompt_len;
  receive.context_instance = "prefill";
  return ranks.generation->transceiver().RequestAndReceiveAsync(receive);
}

// The final statuses of one side, at least `at_least` unless `deadline` passes
// first, each request's pages released; an error unless all succeeded.
absl::StatusOr<std::vector<RequestStatus>> Collect(Rank& rank, bool context, size_t at_least,
                                                   absl::Time deadline) {
  std::vector<RequestStatus> out;
  do {
    const size_t want = at_least - std::min(at_least, out.size());
    std::vector<RequestStatus> got =
        context ? rank.transceiver().CheckContextTransferStatus(want, deadline)
                : rank.transceiver().CheckGenTransferStatus(want, deadline);
    for (RequestStatus& s : got) {
      if (s.state != SessionState::kFullyTransferred) {
        return absl::InternalError(absl::StrCat("request=", s.unique_rid, " ended ",
                                                transfer::SessionStateName(s.state), ": ",
                                                s.error.ToString()));
      }
      // Final: its pages are the engine's again (guarantee 1).
      if (absl::Status r = rank.manager().Release(s.unique_rid); !r.ok()) return r;
      out.push_back(std::move(s));
    }
    if (got.empty()) break;
  } while (out.size() < at_least);
  return out;
}

// Exactly one request's final status, within five minutes.
absl::StatusOr<RequestStatus> One(Rank& rank, bool context) {
  absl::StatusOr<std::vector<RequestStatus>> got =
      Collect(rank, context, 1, absl::Now() + absl::Minutes(5));
  if (!got.ok()) return got.status();
  if (got->size() != 1) {
    return absl::DeadlineExceededError(
        absl::StrCat("expected one final request, got ", got->size(), " in 5 minutes"));
  }
  return (*got)[0];
}

std::string RunfilesPath(const char* argv0, absl::string_view target) {
  for (const char* var : {"RUNFILES_DIR", "TEST_SRCDIR"}) {
    if (const char* dir = std::getenv(var)) return absl::StrCat(dir, "/kvx/", target);
  }
  return absl::StrCat(argv0, ".runfiles/kvx/", target);
}

// //transport:bench's MB/s for one size (its "stream" row), run now as a child.
absl::StatusOr<double> TransportBench(const std::string& path, uint64_t size) {
  const std::string provider = absl::GetFlag(FLAGS_transport);
  std::vector<std::string> args = {
      absl::StrCat("--provider=", provider), absl::StrCat("--sizes=", size),
      absl::StrCat("--buffer_bytes=", size),
      absl::StrCat("--bytes_per_size=", size * static_cast<uint64_t>(absl::GetFlag(FLAGS_iters))),
      "--scatter_count=0", "--repeat=3"};
  absl::StatusOr<std::unique_ptr<ChildProcess>> child = ChildProcess::Spawn(path, args);
  if (!child.ok()) return child.status();
  const absl::Time deadline = absl::Now() + absl::Minutes(10);
  for (;;) {
    absl::StatusOr<std::string> line = (*child)->ReadLine(deadline);
    if (!line.ok()) {
      return absl::Status(line.status().code(),
                          absl::StrCat("//transport:bench (", path, "): ", line.status().message()));
    }
    std::vector<absl::string_view> columns = absl::StrSplit(*line, ' ', absl::SkipEmpty());
    double mbps = 0;
    if (columns.size() >= 6 && columns[0] == "stream" && absl::SimpleAtod(columns[5], &mbps)) {
      return mbps / 1e3;  // GB/s
    }
  }
}

// Every layer in one full-attention group, so every block of a request moves.
ModelOptions FullAttention(int64_t layers, int64_t heads, int64_t head_size) {
  ModelOptions model;
  model.num_layers = layers;
  model.num_kv_heads = heads;
  model.head_size = head_size;
  model.tokens_per_block = 16;
  model.windows = {std::nullopt};
  return model;
}

void Header(const char* title, const char* columns) {
  std::printf("\n# %s\n%s\n", title, columns);
}

absl::Status Bandwidth(const char* argv0, json* out) {
  // All full attention (everything moves), a 512 KiB block: 8 layers x K,V x 8 heads
  // x 16 tokens x 128 x 2 bytes.
  const ModelOptions model = FullAttention(8, 8, 128);
  const uint64_t block_bytes = 8 * 2 * 8 * 16 * 128 * 2;
  std::vector<uint64_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sizes), ',')) {
    uint64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v < block_bytes || v > (uint64_t{1} << 34)) {
      return absl::InvalidArgumentError(
          absl::StrCat("sizes must be in [one block, 16 GiB]: size=", s, " block=", block_bytes));
    }
    sizes.push_back(v);
  }
  const int64_t iters = std::max<int64_t>(1, absl::GetFlag(FLAGS_iters));
  const bool verify = absl::GetFlag(FLAGS_verify);
  const std::string bench = absl::GetFlag(FLAGS_transport_bench_path).empty()
                                ? RunfilesPath(argv0, "transport/bench")
                                : absl::GetFlag(FLAGS_transport_bench_path);
  Header("bandwidth: one request at a time, TP1 -> TP1, every block moves",
         "pattern        bytes   iters    total       time     GB/s   usec/req  "
         "transport_GB/s  ratio");
  uint64_t rid = 1;
  for (uint64_t size : sizes) {
    const int64_t blocks = static_cast<int64_t>(size / block_bytes);
    const int64_t prompt = blocks * model.tokens_per_block;
    absl::StatusOr<Ranks> ranks = MakeRanks(model, blocks);
    if (!ranks.ok()) return ranks.status();
    std::vector<absl::Duration> times;
    uint64_t moved = 0;
    for (int64_t i = 0; i <= iters; ++i, ++rid) {  // i == 0 warms up (connects)
      if (absl::Status s = Allocate(*ranks, rid, blocks); !s.ok()) return s;
      if (verify || i == 0) {
        for (int64_t b = 0; b < blocks; ++b) {
          ranks->context->layout().FillBlock(rid, 0, b, ranks->context->slot(0, b));
        }
      }
      const absl::Time start = absl::Now();
      if (absl::Status s = Post(*ranks, rid, prompt); !s.ok()) return s;
      absl::StatusOr<RequestStatus> got = One(*ranks->generation, false);
      const absl::Duration took = absl::Now() - start;
      if (!got.ok()) return got.status();
      absl::StatusOr<RequestStatus> sent = One(*ranks->context, true);
      if (!sent.ok()) return sent.status();
      if (verify || i == 0) {
        for (int64_t b = 0; b < blocks; ++b) {
          if (auto m = ranks->generation->layout().CheckBlock(rid, 0, b,
                                                              ranks->generation->slot(0, b))) {
            return absl::DataLossError(absl::StrCat("wrong byte: request=", rid, " block=", b,
                                                    " offset=", m->offset, " ", m->where));
          }
        }
      }
      if (i > 0) {
        times.push_back(took);
        moved += sent->metrics.bytes;
      }
    }
    std::sort(times.begin(), times.end());
    const absl::Duration median = times[times.size() / 2];
    absl::Duration total;
    for (absl::Duration t : times) total += t;
    const double gbps = static_cast<double>(blocks * block_bytes) / absl::ToDoubleSeconds(median) / 1e9;
    std::optional<double> transport;
    if (absl::GetFlag(FLAGS_transport_bench) && absl::GetFlag(FLAGS_transport) != "loopback") {
      ranks->context.reset();  // its spinning endpoints would take the bench's cores
      ranks->generation.reset();
      absl::StatusOr<double> t = TransportBench(bench, blocks * block_bytes);
      if (!t.ok()) return t.status();
      transport = *t;
    }
    std::printf("e2e     %12llu %7lld %8s %9.3fs %8.3f %10.1f %15s %6s\n",
                static_cast<unsigned long long>(blocks * block_bytes),
                static_cast<long long>(iters), absl::StrCat(moved >> 20, "m").c_str(),
                absl::ToDoubleSeconds(total), gbps, absl::ToDoubleMicroseconds(median),
                transport ? absl::StrFormat("%.3f", *transport).c_str() : "-",
                transport ? absl::StrFormat("%.2f", gbps / *transport).c_str() : "-");
    std::fflush(stdout);
    (*out)["bandwidth"].push_back({{"bytes", blocks * block_bytes},
                                   {"iters", iters},
                                   {"median_gbps", gbps},
                                   {"median_us", absl::ToDoubleMicroseconds(median)},
                                   {"transport_bench_gbps", transport ? json(*transport) : json()},
                                   {"verified", verify}});
  }
  return absl::OkStatus();
}

// The small model of the overhead and rate rows: one 2 KiB block.
ModelOptions OneBlockModel() { return FullAttention(1, 1, 64); }

absl::StatusOr<double> ZeroMqRoundTripUs(int64_t n) {
  absl::StatusOr<std::unique_ptr<transfer::ControlChannel>> a = transfer::ControlChannel::Create({});
  if (!a.ok()) return a.status();
  absl::StatusOr<std::unique_ptr<transfer::ControlChannel>> b = transfer::ControlChannel::Create({});
  if (!b.ok()) return b.status();
  const std::string payload(64, 'x');
  std::vector<transfer::ControlChannel::Incoming> in;
  auto receive = [&](transfer::ControlChannel& c) -> absl::Status {
    in.clear();
    const absl::Time deadline = absl::Now() + absl::Seconds(5);
    while (in.empty()) {
      if (absl::Status s = c.Poll(deadline, &in); !s.ok()) return s;
      if (in.empty() && absl::Now() >= deadline) return absl::DeadlineExceededError("no echo");
    }
    return absl::OkStatus();
  };
  std::vector<absl::Duration> times;
  for (int64_t i = 0; i <= n; ++i) {  // the first connects
    const absl::Time start = absl::Now();
    if (absl::Status s = (*a)->Send((*b)->address(), payload); !s.ok()) return s;
    if (absl::Status s = receive(**b); !s.ok()) return s;
    if (absl::Status s = (*b)->Send((*a)->address(), payload); !s.ok()) return s;
    if (absl::Status s = receive(**a); !s.ok()) return s;
    if (i > 0) times.push_back(absl::Now() - start);
  }
  std::sort(times.begin(), times.end());
  return absl::ToDoubleMicroseconds(times[times.size() / 2]);
}

absl::Status Overhead(json* out) {
  const int64_t n = std::max<int64_t>(1, absl::GetFlag(FLAGS_overhead_requests));
  absl::StatusOr<Ranks> ranks = MakeRanks(OneBlockModel(), 4);
  if (!ranks.ok()) return ranks.status();
  std::vector<double> e2e, plan, post, transfer, sender;
  for (int64_t i = 0; i <= n; ++i) {
    const uint64_t rid = 1000000 + static_cast<uint64_t>(i);
    if (absl::Status s = Allocate(*ranks, rid, 1); !s.ok()) return s;
    // The context side's task is there first (prefill done), then the generation
    // side asks: its wait is the request's overhead.
    transceiver::ContextRequest send;
    send.unique_rid = rid;
    send.prompt_len = 16;
    if (absl::Status s = ranks->context->transceiver().RespondAndSendAsync(send); !s.ok()) return s;
    transceiver::GenerationRequest receive;
    receive.unique_rid = rid;
    receive.prompt_len = 16;
    receive.context_instance = "prefill";
    const absl::Time start = absl::Now();
    if (absl::Status s = ranks->generation->transceiver().RequestAndReceiveAsync(receive); !s.ok()) {
      return s;
    }
    absl::StatusOr<RequestStatus> got = One(*ranks->generation, false);
    const absl::Duration took = absl::Now() - start;
    if (!got.ok()) return got.status();
    absl::StatusOr<RequestStatus> sent = One(*ranks->context, true);
    if (!sent.ok()) return sent.status();
    if (i == 0) continue;  // warm-up
    e2e.push_back(absl::ToDoubleMicroseconds(took));
    plan.push_back(absl::ToDoubleMicroseconds(sent->metrics.plan));
    post.push_back(absl::ToDoubleMicroseconds(sent->metrics.post));
    transfer.push_back(absl::ToDoubleMicroseconds(sent->metrics.transfer));
  }
  absl::StatusOr<double> zmq = ZeroMqRoundTripUs(std::min<int64_t>(n, 2000));
  if (!zmq.ok()) return zmq.status();
  auto median = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
  };
  auto p99 = [](std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v[std::min(v.size() - 1, v.size() * 99 / 100)];
  };
  Header("overhead: a one-block request (2 KiB), one at a time; medians in usec",
         "pattern      iters   e2e_us   e2e_p99   plan_us   post_us  transfer_us  zmq_rtt_us");
  std::printf("overhead  %8lld %8.1f %9.1f %9.1f %9.1f %12.1f %11.1f\n",
              static_cast<long long>(n), median(e2e), p99(e2e), median(plan), median(post),
              median(transfer), *zmq);
  std::fflush(stdout);
  (*out)["overhead"] = {{"requests", n},          {"e2e_us", median(e2e)},
                        {"e2e_p99_us", p99(e2e)}, {"plan_us", median(plan)},
                        {"post_us", median(post)}, {"transfer_us", median(transfer)},
                        {"zmq_round_trip_us", *zmq}};
  return absl::OkStatus();
}

absl::Status Rate(json* out) {
  const int64_t n = std::max<int64_t>(1, absl::GetFlag(FLAGS_rate_requests));
  const int64_t window = std::max<int64_t>(1, absl::GetFlag(FLAGS_window));
  absl::StatusOr<Ranks> ranks = MakeRanks(OneBlockModel(), window + 1);
  if (!ranks.ok()) return ranks.status();
  const uint64_t first = 2000000;
  const absl::Time start = absl::Now();
  int64_t issued = 0;
  int64_t generation_done = 0;
  int64_t context_done = 0;
  while (generation_done < n || context_done < n) {
    // A request is in flight until both sides reported it final.
    while (issued < n && issued - std::min(generation_done, context_done) < window) {
      const uint64_t rid = first + static_cast<uint64_t>(issued++);
      if (absl::Status s = Allocate(*ranks, rid, 1); !s.ok()) return s;
      if (absl::Status s = Post(*ranks, rid, 16); !s.ok()) return s;
    }
    // Waits a little for the generation side, then takes whatever either side has.
    absl::StatusOr<std::vector<RequestStatus>> got =
        Collect(*ranks->generation, false, 1, absl::Now() + absl::Milliseconds(1));
    if (!got.ok()) return got.status();
    absl::StatusOr<std::vector<RequestStatus>> sent =
        Collect(*ranks->context, true, 0, absl::InfinitePast());
    if (!sent.ok()) return sent.status();
    generation_done += static_cast<int64_t>(got->size());
    context_done += static_cast<int64_t>(sent->size());
    if (absl::Now() - start > absl::Minutes(10)) {
      return absl::DeadlineExceededError(absl::StrCat(
          "rate: requests not final in 10 minutes: generation_done=", generation_done,
          " context_done=", context_done, " requests=", n));
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  Header("rate: one-block requests, many in flight",
         "pattern      requests  window    time     req/s   usec/req");
  std::printf("rate      %11lld %7lld %7.3fs %9.0f %10.1f\n", static_cast<long long>(n),
              static_cast<long long>(window), seconds, n / seconds, seconds * 1e6 / n);
  std::fflush(stdout);
  (*out)["rate"] = {{"requests", n}, {"window", window}, {"seconds", seconds},
                    {"requests_per_second", n / seconds}};
  return absl::OkStatus();
}

absl::Status Main(const char* argv0) {
  const std::string load_before = LoadAverage();
  std::printf("# transceiver_benchmark transport=%s load_average=%s (1, 5, 15 min) cpus=%ld\n",
              absl::GetFlag(FLAGS_transport).c_str(), load_before.c_str(),
              sysconf(_SC_NPROCESSORS_ONLN));
  json out = {{"transport", absl::GetFlag(FLAGS_transport)}, {"load_before", load_before}};
  if (absl::Status s = Bandwidth(argv0, &out); !s.ok()) return s;
  if (absl::Status s = Overhead(&out); !s.ok()) return s;
  if (absl::Status s = Rate(&out); !s.ok()) return s;
  out["load_after"] = LoadAverage();
  std::printf("\n# load_average after: %s\n%s\n", out["load_after"].get<std::string>().c_str(),
              out.dump().c_str());
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvx::harness

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "End-to-end Transceiver bandwidth, per-request overhead and request rate, beside "
      "//transport:bench and a ZeroMQ round trip.\n"
      "  bazel run -c opt //tools:transceiver_benchmark\n"
      "  bazel run -c opt //tools:transceiver_benchmark -- --transport=shm --verify\n"
      "  bazel run -c opt //tools:transceiver_benchmark -- --sizes=268435456 --iters=10");
  absl::ParseCommandLine(argc, argv);
  absl::Status status = kvx::harness::Main(argv[0]);
  if (!status.ok()) {
    std::fprintf(stderr, "transceiver_benchmark: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
