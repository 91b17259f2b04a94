// The soak's driver: plans batches, runs them on both sides, checks each and the
// resources at the end, and reports.

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "tools/transceiver_harness.h"
#include "tools/transceiver_soak.h"
#include "transport/internal/sanitizers.h"

namespace kvx::harness {

using nlohmann::json;

namespace {

constexpr FaultKind kKinds[] = {FaultKind::kNone, FaultKind::kWrite, FaultKind::kDelay,
                                FaultKind::kDrop, FaultKind::kReconnect};
constexpr size_t kNumKinds = sizeof(kKinds) / sizeof(kKinds[0]);

size_t Index(FaultKind kind) { return static_cast<size_t>(kind); }

}  // namespace

absl::string_view FaultKindName(FaultKind kind) {
  switch (kind) {
    case FaultKind::kNone:
      return "none";
    case FaultKind::kWrite:
      return "write";
    case FaultKind::kDelay:
      return "delay";
    case FaultKind::kDrop:
      return "drop";
    case FaultKind::kReconnect:
      return "reconnect";
  }
  return "unknown";
}

absl::StatusOr<FaultKind> ParseFaultKind(absl::string_view name) {
  for (FaultKind kind : kKinds) {
    if (FaultKindName(kind) == name) return kind;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown fault (write, delay, drop, reconnect or none): fault=", name));
}

json ToJson(const SoakBatch& b) {
  return json{{"index", b.index},           {"seed", b.seed},
              {"first_rid", b.first_rid},   {"fault", FaultKindName(b.fault)},
              {"fault_rank", b.fault_rank}, {"fault_after", b.fault_after},
              {"fail_write", b.fail_write}};
}

absl::StatusOr<SoakBatch> SoakBatchFromJson(const json& in) {
  SoakBatch b;
  try {
    in.at("index").get_to(b.index);
    in.at("seed").get_to(b.seed);
    in.at("first_rid").get_to(b.first_rid);
    absl::StatusOr<FaultKind> fault = ParseFaultKind(in.at("fault").get<std::string>());
    if (!fault.ok()) return fault.status();
    b.fault = *fault;
    in.at("fault_rank").get_to(b.fault_rank);
    in.at("fault_after").get_to(b.fault_after);
    in.at("fail_write").get_to(b.fail_write);
  } catch (const json::exception& e) {
    return absl::InvalidArgumentError(absl::StrCat("not a soak batch: ", e.what()));
  }
  return b;
}

SoakBatch PlanSoakBatch(const RunOptions& options, const SoakOptions& soak, int64_t index) {
  SoakBatch b;
  b.index = index;
  b.seed = options.workload.seed + static_cast<uint64_t>(index) * 1000003;
  b.first_rid = options.workload.first_rid + static_cast<uint64_t>(index * soak.batch_requests);
  if (index % 2 == 1 && !soak.faults.empty()) {
    const int64_t n = index / 2;  // the n-th fault batch
    const int64_t kinds = static_cast<int64_t>(soak.faults.size());
    b.fault = soak.faults[n % kinds];
    // Each kind visits every context rank in turn, at moments from 10% to 50% in.
    b.fault_rank = (n / kinds) % std::max<int64_t>(1, options.context.ranks());
    b.fault_after = 0.1 + 0.1 * static_cast<double>((n / kinds) % 5);
    b.fail_write = (n * 7) % 16;
  }
  return b;
}

// AddressSanitizer keeps freed memory in its quarantine (256 MiB by default), so RSS
// grows with every allocation until the quarantine is full: under it RSS may grow by
// that much more (its LeakSanitizer looks for leaks instead).
int64_t RssAllowanceKb(const SoakOptions& soak) {
  constexpr int64_t kQuarantineKb = transport_internal::kAddressSanitizer ? (256 << 10) : 0;
  return soak.rss_slack_kb + kQuarantineKb;
}

std::vector<std::string> CheckSoakResources(const std::string& side, const SoakSample& warmup,
                                            const SoakSample& end, const SoakOptions& soak) {
  std::vector<std::string> problems;
  auto grew = [&](absl::string_view what, int64_t from, int64_t to, int64_t slack) {
    if (to - from > slack) {
      problems.push_back(absl::StrCat(side, ": ", what, " grew from warm-up to end by more than ",
                                      "its slack: warmup=", from, " end=", to, " slack=", slack));
    }
  };
  grew("RSS (kB)", warmup.process.rss_kb, end.process.rss_kb, RssAllowanceKb(soak));
  grew("open file descriptors", warmup.process.fds, end.process.fds, soak.fd_slack);
  grew("threads", warmup.process.threads, end.process.threads, soak.thread_slack);
  grew("registered transport regions", warmup.regions, end.regions, 0);
  grew("transport peers", warmup.peers, end.peers, 0);
  const std::pair<absl::string_view, int64_t> drained[] = {
      {"transfers tracked by the transport", end.transfers},
      {"transceiver sessions", end.sessions},
      {"live requests", end.live_requests},
      {"remembered cancels", end.remembered_cancels}};
  for (const auto& [what, value] : drained) {
    if (value != 0) {
      problems.push_back(
          absl::StrCat(side, ": ", what, " still held after the drain: count=", value));
    }
  }
  return problems;
}

std::vector<std::string> CheckSoakBatch(const RunOptions& options, const SoakOptions& soak,
                                        const SoakBatch& batch, const SideReport& context,
                                        const SideReport& generation,
                                        int64_t failed_writes_injected) {
  std::vector<std::string> problems;
  // The requests in flight around a window: those running when it opened and those
  // started while it was open, on every rank.
  const int64_t ranks = std::max(options.context.ranks(), options.generation.ranks());
  const int64_t window_bound = ranks * (2 * options.concurrency + soak.fault_window);
  for (const SideReport* side : {&context, &generation}) {
    const std::string name = absl::StrCat(side->role, " side");
    // The first few failures, enough to see a pattern.
    std::string first;
    for (size_t i = 0; i < side->failures.size() && i < 3; ++i) {
      absl::StrAppend(&first, i == 0 ? ": first: " : " | ", side->failures[i]);
    }
    if (side->requests != soak.batch_requests ||
        side->succeeded + side->cancelled + side->failed != side->requests) {
      problems.push_back(absl::StrCat(name, ": requests not accounted for: requests=",
                                      side->requests, " expected=", soak.batch_requests,
                                      " succeeded=", side->succeeded, " cancelled=",
                                      side->cancelled, " failed=", side->failed));
    }
    if (side->mismatches > 0 || side->late_writes > 0) {
      problems.push_back(absl::StrCat(name, ": bytes wrong: requests_with_wrong_bytes=",
                                      side->mismatches, " late_writes=", side->late_writes,
                                      first));
    }
    if (side->failed == 0) continue;
    switch (batch.fault) {
      case FaultKind::kNone:
        problems.push_back(absl::StrCat(name, ": requests failed in a clean batch: failed=",
                                        side->failed, first));
        break;
      case FaultKind::kWrite:
        if (side->failed > failed_writes_injected) {
          problems.push_back(absl::StrCat(
              name, ": more requests failed than writes were failed: failed=", side->failed,
              " failed_writes=", failed_writes_injected, first));
        }
        for (const std::string& failure : side->failures) {
          if (!absl::StrContains(failure, "injected fault")) {
            problems.push_back(
                absl::StrCat(name, ": a request failed for another reason: ", failure));
            break;
          }
        }
        break;
      default:
        if (side->failed > window_bound) {
          problems.push_back(absl::StrCat(
              name, ": more requests failed than were in flight around the fault: failed=",
              side->failed, " bound=", window_bound, first));
        }
        break;
    }
  }
  return problems;
}

namespace {

struct Answer {
  SideReport report;
  SoakSample sample;
  int64_t armed = 0;
  int64_t faulted[kNumKinds] = {};
};

absl::StatusOr<Answer> ParseAnswer(const char* side, const json& in) {
  auto fail = [side](absl::string_view why) {
    return absl::InternalError(absl::StrCat(side, " side: ", why));
  };
  if (in.contains("error")) return fail(in["error"].dump());
  Answer answer;
  absl::StatusOr<SideReport> report = SideReportFromJson(in.value("report", json()));
  if (!report.ok()) return fail(report.status().ToString());
  answer.report = *std::move(report);
  absl::StatusOr<SoakSample> sample = SoakSampleFromJson(in.value("sample", json()));
  if (!sample.ok()) return fail(sample.status().ToString());
  answer.sample = *sample;
  answer.armed = in.value("armed", int64_t{0});
  const json faulted = in.value("faulted_transfers", json::object());
  for (FaultKind kind : kKinds) {
    answer.faulted[Index(kind)] = faulted.value(std::string(FaultKindName(kind)), int64_t{0});
  }
  return answer;
}

void Add(SoakSideTotals& totals, const Answer& a, FaultKind fault) {
  const SideReport& r = a.report;
  totals.instance = r.instance;
  totals.shape = r.shape;
  totals.requests += r.requests;
  totals.succeeded += r.succeeded;
  totals.cancelled += r.cancelled;
  totals.failed += r.failed;
  totals.bytes += r.bytes;
  totals.bytes_checked += r.bytes_checked;
  totals.peak_rss_kb = std::max(totals.peak_rss_kb, a.sample.process.hwm_kb);
  totals.samples.push_back(a.sample);
  totals.fault_events[Index(fault)] += a.armed;
}

std::string Mb(int64_t kb) { return absl::StrFormat("%.1f", kb / 1024.0); }

std::string ProgressLine(const SoakReport& r, absl::Duration elapsed) {
  const SoakSample& c = r.context.samples.back();
  const SoakSample& g = r.generation.samples.back();
  int64_t events = 0;
  for (FaultKind kind : kKinds) {
    events += r.context.fault_events[Index(kind)] + r.generation.fault_events[Index(kind)];
  }
  return absl::StrFormat(
      "soak: %.0f s, %d batches, %d requests (%d failed, in fault batches), %d faults; "
      "RSS MB %s / %s, fds %d / %d, sessions %d / %d (context / generation)",
      absl::ToDoubleSeconds(elapsed), r.batches, r.generation.requests, r.generation.failed,
      events, Mb(c.process.rss_kb), Mb(g.process.rss_kb), c.process.fds, g.process.fds,
      c.sessions, g.sessions);
}

}  // namespace

absl::StatusOr<SoakReport> RunSoak(const RunOptions& options, const SoakOptions& soak,
                                   SoakLink& context, SoakLink& generation) {
  SoakReport report;
  report.transport = options.transport.kind;
  report.warmup_batch = -1;
  const absl::Time start = absl::Now();
  absl::Time next_line = start + soak.report_interval;
  auto exchange = [&](const json& command) -> absl::StatusOr<std::pair<json, json>> {
    if (absl::Status sent = context.Send(command); !sent.ok()) return sent;
    if (absl::Status sent = generation.Send(command); !sent.ok()) return sent;
    const absl::Time deadline = absl::Now() + soak.batch_timeout + absl::Minutes(1);
    absl::StatusOr<json> g = generation.Receive(deadline);
    if (!g.ok()) return absl::Status(g.status().code(), absl::StrCat("generation side: ", g.status().message()));
    absl::StatusOr<json> c = context.Receive(deadline);
    if (!c.ok()) return absl::Status(c.status().code(), absl::StrCat("context side: ", c.status().message()));
    return std::make_pair(*std::move(c), *std::move(g));
  };
  // Every fault once at least, however short the duration.
  const int64_t min_batches = std::max<int64_t>(1, 2 * static_cast<int64_t>(soak.faults.size()));
  for (int64_t index = 0; index < min_batches || absl::Now() - start < soak.duration; ++index) {
    const SoakBatch batch = PlanSoakBatch(options, soak, index);
    absl::StatusOr<std::pair<json, json>> answers = exchange(json{{"batch", ToJson(batch)}});
    if (!answers.ok()) return answers.status();
    absl::StatusOr<Answer> c = ParseAnswer("context", answers->first);
    if (!c.ok()) return c.status();
    absl::StatusOr<Answer> g = ParseAnswer("generation", answers->second);
    if (!g.ok()) return g.status();
    ++report.batches;
    report.fault_batches += batch.fault == FaultKind::kNone ? 0 : 1;
    Add(report.context, *c, batch.fault);
    Add(report.generation, *g, batch.fault);
    for (FaultKind kind : kKinds) report.faulted_transfers[Index(kind)] += c->faulted[Index(kind)];
    std::vector<std::string> problems = CheckSoakBatch(
        options, soak, batch, c->report, g->report, c->faulted[Index(FaultKind::kWrite)]);
    for (const auto& [side, a, answer] :
         {std::make_tuple("context", &*c, &answers->first),
          std::make_tuple("generation", &*g, &answers->second)}) {
      // Every request is final and collected at a batch's end: nothing of it may stay.
      if (a->sample.live_requests != 0 || a->sample.transfers != 0) {
        problems.push_back(absl::StrCat(side, " side: held at the end of the batch: live_requests=",
                                        a->sample.live_requests,
                                        " transfers=", a->sample.transfers));
      }
      for (const json& p : answer->value("problems", json::array())) {
        problems.push_back(absl::StrCat(side, " side: ", p.get<std::string>()));
      }
    }
    if (report.warmup_batch < 0 && index >= 1 && absl::Now() - start >= soak.warmup) {
      report.warmup_batch = index;
      report.context.warmup = c->sample;
      report.generation.warmup = g->sample;
    }
    for (const std::string& p : problems) {
      report.problems.push_back(
          absl::StrCat("batch=", index, " fault=", FaultKindName(batch.fault), ": ", p));
    }
    if (!problems.empty()) break;
    if (absl::Now() >= next_line) {
      std::fprintf(stderr, "%s\n", ProgressLine(report, absl::Now() - start).c_str());
      next_line = absl::Now() + soak.report_interval;
    }
  }
  if (report.warmup_batch < 0) {  // a short run: its first batch
    report.warmup_batch = 0;
    report.context.warmup = report.context.samples.front();
    report.generation.warmup = report.generation.samples.front();
  }
  absl::StatusOr<std::pair<json, json>> drained = exchange(json{{"drain", true}});
  if (!drained.ok()) return drained.status();
  report.drained = true;
  for (auto& [side, totals, answer] :
       {std::make_tuple("context", &report.context, &drained->first),
        std::make_tuple("generation", &report.generation, &drained->second)}) {
    absl::StatusOr<SoakSample> end = SoakSampleFromJson(answer->value("sample", json()));
    if (!end.ok()) return absl::InternalError(absl::StrCat(side, " side: ", end.status().ToString()));
    totals->end = *end;
    totals->peak_rss_kb = std::max(totals->peak_rss_kb, end->process.hwm_kb);
    report.drained &= answer->value("drained", false);
    for (std::string& p : CheckSoakResources(side, totals->warmup, *end, soak)) {
      report.problems.push_back(std::move(p));
    }
  }
  for (FaultKind kind : soak.faults) {
    // A kind that had its batch but never hit a transfer tested nothing.
    const bool had_batch = report.context.fault_events[Index(kind)] +
                               report.generation.fault_events[Index(kind)] > 0;
    if (had_batch && kind != FaultKind::kReconnect && report.faulted_transfers[Index(kind)] == 0) {
      report.problems.push_back(absl::StrCat("fault=", FaultKindName(kind),
                                             ": armed but no transfer was hit: it tested nothing"));
    }
  }
  report.seconds = absl::ToDoubleSeconds(absl::Now() - start);
  return report;
}

std::string FormatSoakTable(const SoakReport& r) {
  const SoakSideTotals& c = r.context;
  const SoakSideTotals& g = r.generation;
  std::string out = absl::StrFormat(
      "transceiver soak: context %s (%s) -> generation %s (%s) over %s, %.1f s, %d batches "
      "(%d with faults)\n",
      c.instance, c.shape, g.instance, g.shape, r.transport, r.seconds, r.batches,
      r.fault_batches);
  auto row = [&out](const std::string& name, const std::string& context,
                    const std::string& generation) {
    absl::StrAppendFormat(&out, "  %-34s %18s %18s\n", name, context, generation);
  };
  auto n = [](int64_t v) { return absl::StrCat(v); };
  auto arrow = [](int64_t from, int64_t to) { return absl::StrCat(from, " -> ", to); };
  row("", "context", "generation");
  row("requests", n(c.requests), n(g.requests));
  row("  succeeded", n(c.succeeded), n(g.succeeded));
  row("  cancelled", n(c.cancelled), n(g.cancelled));
  row("  failed (fault batches only)", n(c.failed), n(g.failed));
  row("bytes moved", absl::StrFormat("%.3f GB", c.bytes / 1e9),
      absl::StrFormat("%.3f GB", g.bytes / 1e9));
  row("bytes verified", "", absl::StrFormat("%.3f GB", g.bytes_checked / 1e9));
  row("faults armed / transfers hit", "", "");
  for (FaultKind kind : {FaultKind::kWrite, FaultKind::kDelay, FaultKind::kDrop}) {
    row(absl::StrCat("  ", FaultKindName(kind)),
        absl::StrCat(c.fault_events[Index(kind)], " / ", r.faulted_transfers[Index(kind)]), "");
  }
  row("  reconnect (control plane)", "",
      absl::StrCat(g.fault_events[Index(FaultKind::kReconnect)], " / -"));
  row("peak RSS (VmHWM), MB", Mb(c.peak_rss_kb), Mb(g.peak_rss_kb));
  absl::StrAppendFormat(&out, "  resources: warm-up (after batch %d, %.0f s) -> end (%s)\n",
                        r.warmup_batch, c.warmup.seconds,
                        r.drained ? "drained" : "NOT drained");
  row("  RSS, MB", absl::StrCat(Mb(c.warmup.process.rss_kb), " -> ", Mb(c.end.process.rss_kb)),
      absl::StrCat(Mb(g.warmup.process.rss_kb), " -> ", Mb(g.end.process.rss_kb)));
  row("  open file descriptors", arrow(c.warmup.process.fds, c.end.process.fds),
      arrow(g.warmup.process.fds, g.end.process.fds));
  row("  threads", arrow(c.warmup.process.threads, c.end.process.threads),
      arrow(g.warmup.process.threads, g.end.process.threads));
  row("  registered regions", arrow(c.warmup.regions, c.end.regions),
      arrow(g.warmup.regions, g.end.regions));
  row("  transport peers", arrow(c.warmup.peers, c.end.peers), arrow(g.warmup.peers, g.end.peers));
  row("  transfers tracked", arrow(c.warmup.transfers, c.end.transfers),
      arrow(g.warmup.transfers, g.end.transfers));
  row("  transceiver sessions", arrow(c.warmup.sessions, c.end.sessions),
      arrow(g.warmup.sessions, g.end.sessions));
  row("  live requests", arrow(c.warmup.live_requests, c.end.live_requests),
      arrow(g.warmup.live_requests, g.end.live_requests));
  row("  remembered cancels", arrow(c.warmup.remembered_cancels, c.end.remembered_cancels),
      arrow(g.warmup.remembered_cancels, g.end.remembered_cancels));
  for (const std::string& p : r.problems) absl::StrAppend(&out, "  FAILED ", p, "\n");
  absl::StrAppend(&out, r.ok() ? "  result: OK\n" : "  result: FAILED\n");
  return out;
}

json ToJson(const SoakReport& r) {
  auto side = [](const SoakSideTotals& s) {
    return json{{"instance", s.instance},
                {"shape", s.shape},
                {"requests", s.requests},
                {"succeeded", s.succeeded},
                {"cancelled", s.cancelled},
                {"failed", s.failed},
                {"bytes", s.bytes},
                {"bytes_checked", s.bytes_checked},
                {"peak_rss_kb", s.peak_rss_kb},
                {"warmup", ToJson(s.warmup)},
                {"end", ToJson(s.end)}};
  };
  json faults = json::object();
  for (FaultKind kind : kKinds) {
    if (kind == FaultKind::kNone) continue;
    faults[std::string(FaultKindName(kind))] = {
        {"armed", r.context.fault_events[Index(kind)] + r.generation.fault_events[Index(kind)]},
        {"transfers", r.faulted_transfers[Index(kind)]}};
  }
  return json{{"command", "soak"},
              {"ok", r.ok()},
              {"seconds", r.seconds},
              {"transport", r.transport},
              {"batches", r.batches},
              {"fault_batches", r.fault_batches},
              {"warmup_batch", r.warmup_batch},
              {"drained", r.drained},
              {"requests", r.generation.requests},
              {"succeeded", r.generation.succeeded},
              {"cancelled", r.generation.cancelled},
              {"failed", r.generation.failed},
              {"bytes_moved", r.generation.bytes},
              {"bytes_verified", r.generation.bytes_checked},
              {"faults", faults},
              {"context", side(r.context)},
              {"generation", side(r.generation)},
              {"problems", r.problems}};
}

}  // namespace kvx::harness
