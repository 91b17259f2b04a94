// The soak's parts: its plan, its checks (they must catch what they claim to), the
// counting transport, and a short soak of both instances in this process over
// loopback with every fault (tools/transceiver_soak.h).

#include "tools/transceiver_soak.h"

#include <sys/mman.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "testing/status_matchers.h"
#include "tools/transceiver_harness.h"
#include "transport/fault_injecting_transport.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport.h"

namespace kvx::harness {
namespace {

using ::testing::AllOf;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::SizeIs;

TEST(SoakPlanTest, EveryOtherBatchCyclesThroughTheFaultsAndRidsNeverRepeat) {
  RunOptions options;  // context TP2
  options.workload.first_rid = 100;
  SoakOptions soak;
  soak.batch_requests = 10;
  std::vector<FaultKind> kinds;
  std::set<int64_t> ranks;
  for (int64_t i = 0; i < 16; ++i) {
    const SoakBatch b = PlanSoakBatch(options, soak, i);
    EXPECT_EQ(b.index, i);
    EXPECT_EQ(b.first_rid, 100u + 10u * i);
    if (i % 2 == 0) {
      EXPECT_EQ(b.fault, FaultKind::kNone) << i;
      continue;
    }
    kinds.push_back(b.fault);
    ranks.insert(b.fault_rank);
    EXPECT_GE(b.fault_after, 0.1);
    EXPECT_LE(b.fault_after, 0.5);
    EXPECT_GE(b.fail_write, 0);
  }
  EXPECT_THAT(kinds, ElementsAre(FaultKind::kWrite, FaultKind::kDelay, FaultKind::kDrop,
                                 FaultKind::kReconnect, FaultKind::kWrite, FaultKind::kDelay,
                                 FaultKind::kDrop, FaultKind::kReconnect));
  EXPECT_EQ(ranks, (std::set<int64_t>{0, 1}));  // both context ranks get faults
  EXPECT_NE(PlanSoakBatch(options, soak, 1).seed, PlanSoakBatch(options, soak, 2).seed);
  soak.faults.clear();
  EXPECT_EQ(PlanSoakBatch(options, soak, 1).fault, FaultKind::kNone);
}

TEST(SoakPlanTest, BatchesAndSamplesCrossJsonUnchanged) {
  RunOptions options;
  const SoakBatch b = PlanSoakBatch(options, SoakOptions{}, 5);
  ASSERT_OK_AND_ASSIGN(SoakBatch back, SoakBatchFromJson(ToJson(b)));
  EXPECT_EQ(ToJson(back), ToJson(b));
  EXPECT_FALSE(SoakBatchFromJson(nlohmann::json{{"index", 1}}).ok());
  nlohmann::json wrong = ToJson(b);
  wrong["fault"] = "meteor";
  EXPECT_THAT(SoakBatchFromJson(wrong).status().message(), HasSubstr("fault=meteor"));

  SoakSample s;
  s.seconds = 1.5;
  s.process.rss_kb = 7;
  s.remembered_cancels = 3;
  ASSERT_OK_AND_ASSIGN(SoakSample sample, SoakSampleFromJson(ToJson(s)));
  EXPECT_EQ(ToJson(sample), ToJson(s));
  nlohmann::json missing = ToJson(s);
  missing.erase("sessions");
  EXPECT_THAT(SoakSampleFromJson(missing).status().message(), HasSubstr("field=sessions"));
}

TEST(SoakResourcesTest, ThisProcessIsSampled) {
  ASSERT_OK_AND_ASSIGN(ProcessSample before, SampleProcess());
  EXPECT_GT(before.rss_kb, 0);
  EXPECT_GE(before.hwm_kb, before.rss_kb);
  EXPECT_GT(before.threads, 0);
  EXPECT_GE(before.fds, 3);  // stdin, stdout, stderr at least
  // 64 MiB touched and an open descriptor show up. Fresh pages from the kernel: an
  // allocator (ASan's) may hand back memory that is resident already.
  constexpr size_t kBytes = 64 << 20;
  void* memory = mmap(nullptr, kBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  ASSERT_NE(memory, MAP_FAILED);
  std::memset(memory, 1, kBytes);
  std::unique_ptr<FILE, int (*)(FILE*)> file(std::fopen("/proc/self/status", "r"), &std::fclose);
  ASSERT_NE(file, nullptr);
  ASSERT_OK_AND_ASSIGN(ProcessSample after, SampleProcess());
  EXPECT_GE(after.rss_kb - before.rss_kb, 60 << 10);
  EXPECT_EQ(after.fds, before.fds + 1);
  munmap(memory, kBytes);
}

TEST(SoakResourcesTest, GrowthPastTheSlackAndWhatDidNotDrainAreNamed) {
  SoakOptions soak;  // RSS 64 MiB (more under ASan), 8 descriptors, 2 threads
  const int64_t rss = RssAllowanceKb(soak);
  SoakSample warm;
  warm.process = {100000, 100000, 40, 10};
  warm.regions = 6;
  warm.peers = 2;
  warm.sessions = 50;  // a warm-up sample holds some; the end must hold none
  SoakSample end = warm;
  end.sessions = 0;
  end.process.rss_kb += rss;  // at the slack: fine
  end.process.fds += 8;
  end.process.threads += 2;
  EXPECT_THAT(CheckSoakResources("context", warm, end, soak), IsEmpty());

  end.process.rss_kb += 1;
  end.process.fds += 1;
  end.regions += 1;
  end.peers += 1;
  end.transfers = 2;
  end.sessions = 3;
  end.live_requests = 4;
  end.remembered_cancels = 5;
  const std::vector<std::string> problems = CheckSoakResources("context", warm, end, soak);
  EXPECT_THAT(problems, SizeIs(8));
  EXPECT_THAT(problems, ::testing::Contains(AllOf(HasSubstr("context: RSS"),
                                                  HasSubstr(absl::StrCat("warmup=100000 end=",
                                                                         100001 + rss)),
                                                  HasSubstr(absl::StrCat("slack=", rss)))));
  EXPECT_THAT(problems, ::testing::Contains(HasSubstr("open file descriptors")));
  EXPECT_THAT(problems, ::testing::Contains(AllOf(HasSubstr("registered transport regions"),
                                                  HasSubstr("warmup=6 end=7 slack=0"))));
  EXPECT_THAT(problems, ::testing::Contains(HasSubstr("transport peers")));
  EXPECT_THAT(problems,
              ::testing::Contains(HasSubstr("transceiver sessions still held after the drain: count=3")));
  EXPECT_THAT(problems, ::testing::Contains(HasSubstr("remembered cancels")));
}

SideReport Side(const char* role, int64_t requests, int64_t failed) {
  SideReport r;
  r.role = role;
  r.requests = requests;
  r.failed = failed;
  r.succeeded = requests - failed;
  for (int64_t i = 0; i < failed; ++i) {
    r.failures.push_back(absl::StrCat(role, " request=", i, ": injected fault: remote write failed"));
  }
  return r;
}

TEST(SoakBatchCheckTest, ACleanBatchMayFailNothingAndBytesMustBeRight) {
  RunOptions options;
  SoakOptions soak;
  soak.batch_requests = 100;
  const SoakBatch clean = PlanSoakBatch(options, soak, 0);
  EXPECT_THAT(CheckSoakBatch(options, soak, clean, Side("context", 100, 0),
                             Side("generation", 100, 0), 0),
              IsEmpty());
  EXPECT_THAT(CheckSoakBatch(options, soak, clean, Side("context", 100, 0),
                             Side("generation", 100, 1), 0),
              ElementsAre(HasSubstr("generation side: requests failed in a clean batch: failed=1")));
  SideReport wrong = Side("generation", 100, 0);
  wrong.mismatches = 1;
  wrong.failures = {"generation request=7: wrong byte in a received block"};
  EXPECT_THAT(CheckSoakBatch(options, soak, clean, Side("context", 100, 0), wrong, 0),
              ElementsAre(AllOf(HasSubstr("requests_with_wrong_bytes=1"), HasSubstr("request=7"))));
  EXPECT_THAT(CheckSoakBatch(options, soak, clean, Side("context", 99, 0),
                             Side("generation", 100, 0), 0),
              ElementsAre(HasSubstr("context side: requests not accounted for")));
}

TEST(SoakBatchCheckTest, AWriteBatchFailsOnlyTheRequestsOfItsFailedWrites) {
  RunOptions options;
  SoakOptions soak;
  soak.batch_requests = 100;
  const SoakBatch write = PlanSoakBatch(options, soak, 1);
  ASSERT_EQ(write.fault, FaultKind::kWrite);
  EXPECT_THAT(CheckSoakBatch(options, soak, write, Side("context", 100, 1),
                             Side("generation", 100, 1), 1),
              IsEmpty());
  EXPECT_THAT(CheckSoakBatch(options, soak, write, Side("context", 100, 2),
                             Side("generation", 100, 1), 1),
              ElementsAre(HasSubstr("more requests failed than writes were failed: failed=2 "
                                    "failed_writes=1")));
  SideReport other = Side("generation", 100, 1);
  other.failures = {"generation request=3: ended ERROR: DEADLINE_EXCEEDED"};
  EXPECT_THAT(CheckSoakBatch(options, soak, write, Side("context", 100, 1), other, 1),
              ElementsAre(HasSubstr("a request failed for another reason")));
}

TEST(SoakBatchCheckTest, AWindowBatchFailsAtMostTheRequestsAroundItsWindow) {
  RunOptions options;  // TP2 -> TP1, 8 in flight per rank
  SoakOptions soak;    // window 8
  soak.batch_requests = 100;
  const SoakBatch delay = PlanSoakBatch(options, soak, 3);
  ASSERT_EQ(delay.fault, FaultKind::kDelay);
  const int64_t bound = 2 * (2 * 8 + 8);
  EXPECT_THAT(CheckSoakBatch(options, soak, delay, Side("context", 100, bound),
                             Side("generation", 100, bound), 0),
              IsEmpty());
  EXPECT_THAT(CheckSoakBatch(options, soak, delay, Side("context", 100, bound + 1),
                             Side("generation", 100, 0), 0),
              ElementsAre(HasSubstr("failed=49 bound=48")));
}

TEST(CountingTransportTest, CountsWhatItsUserHoldsAndTheFaultsBelowIt) {
  transport::EndpointOptions endpoint;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<transport::Transport> target,
                       transport::CreateLoopbackTransport(endpoint));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<transport::Transport> inner,
                       transport::CreateLoopbackTransport(endpoint));
  auto faulty_owned = std::make_unique<transport::FaultInjectingTransport>(std::move(inner));
  transport::FaultInjectingTransport* faulty = faulty_owned.get();
  CountingTransport counting(std::move(faulty_owned));

  std::vector<char> src(256, 'x');
  std::vector<char> dst(256, 0);
  ASSERT_OK_AND_ASSIGN(transport::RegionId local,
                       counting.RegisterMemory(src.data(), src.size(), transport::MemoryKind::kHost));
  ASSERT_OK_AND_ASSIGN(transport::RegionId remote_region, target->RegisterMemory(dst.data(), dst.size()));
  ASSERT_OK_AND_ASSIGN(transport::PeerId writer, target->AddPeer(counting.address()));
  ASSERT_OK_AND_ASSIGN(transport::RegionDescriptor grant,
                       target->GrantRemoteWrite(remote_region, writer));
  ASSERT_OK_AND_ASSIGN(transport::PeerId peer, counting.AddPeer(target->address()));
  EXPECT_EQ(counting.counts().regions, 1);
  EXPECT_EQ(counting.counts().peers, 1);

  const transport::WriteOp op{local, 0, grant, 0, 64};
  faulty->FailNthWrite(1);  // the second write from now
  for (int i = 0; i < 2; ++i) {
    ASSERT_OK_AND_ASSIGN(transport::TransferId id,
                         counting.PostWrites(peer, {op}, absl::Now() + absl::Seconds(10)));
    EXPECT_EQ(counting.counts().transfers, 1);
    ASSERT_OK_AND_ASSIGN(transport::TransferStatus status,
                         counting.WaitTransfer(id, absl::Now() + absl::Seconds(10)));
    EXPECT_TRUE(status.final());
    EXPECT_EQ(counting.counts().transfers, 0);  // returned final: forgotten
  }
  EXPECT_EQ(counting.counts().failed_writes, 1);
  faulty->DropAllPeers();
  EXPECT_FALSE(counting.PostWrites(peer, {op}, absl::Now() + absl::Seconds(10)).ok());
  EXPECT_EQ(counting.counts().dropped, 1);
  EXPECT_EQ(counting.counts().transfers, 0);

  ASSERT_OK(counting.RemovePeer(peer));
  ASSERT_OK(counting.DeregisterMemory(local));
  EXPECT_EQ(counting.counts().regions, 0);
  EXPECT_EQ(counting.counts().peers, 0);
  EXPECT_FALSE(counting.DeregisterMemory(local).ok());  // unknown now: no count goes below 0
  EXPECT_EQ(counting.counts().regions, 0);
}

// Both instances in this process over loopback, every fault once or more, small
// batches: the checks pass, every fault kind was armed and hit, and what the
// transceivers keep for a while drains.
TEST(SoakRunTest, AShortInProcessSoakWithEveryFaultPasses) {
  RunOptions options;
  options.transport.kind = "loopback";
  options.workload.max_prompt = 512;
  options.workload.cancel_rate = 0.2;
  options.request_timeout = absl::Seconds(1);  // what a delayed completion costs
  SoakOptions soak;
  soak.duration = absl::Seconds(1);
  soak.batch_requests = 40;
  soak.warmup = absl::ZeroDuration();
  soak.report_interval = absl::Hours(1);
  soak.batch_timeout = absl::Minutes(2);
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<SoakSide> context,
                       SoakSide::Create(options, Role::kContext, soak));
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<SoakSide> generation,
                       SoakSide::Create(options, Role::kGeneration, soak));
  ASSERT_OK(generation->Connect(context->control_addresses(), absl::Now() + absl::Seconds(30)));
  ASSERT_OK(context->Connect({}, absl::Now() + absl::Seconds(30)));
  InProcessSoakLink context_link(context.get());
  InProcessSoakLink generation_link(generation.get());
  ASSERT_OK_AND_ASSIGN(SoakReport report, RunSoak(options, soak, context_link, generation_link));
  const std::string table = FormatSoakTable(report);
  EXPECT_TRUE(report.ok()) << table;
  EXPECT_TRUE(report.drained) << table;
  EXPECT_GE(report.batches, 8) << table;  // every fault at least once, however short
  const nlohmann::json doc = ToJson(report);
  for (const char* kind : {"write", "delay", "drop", "reconnect"}) {
    EXPECT_GE(doc["faults"][kind]["armed"].get<int64_t>(), 1) << kind << "\n" << table;
  }
  for (const char* kind : {"write", "delay", "drop"}) {
    EXPECT_GE(doc["faults"][kind]["transfers"].get<int64_t>(), 1) << kind << "\n" << table;
  }
  EXPECT_EQ(report.generation.requests, report.batches * 40);
  EXPECT_GT(report.generation.bytes_checked, 0u);
  EXPECT_EQ(report.generation.end.sessions, 0);
  EXPECT_EQ(doc["ok"], true);
  EXPECT_THAT(table, HasSubstr("result: OK"));
}

// A side answers an unknown command with an error, and the driver stops on it.
TEST(SoakRunTest, ASideThatAnswersAnErrorStopsTheSoak) {
  RunOptions options;
  options.transport.kind = "loopback";
  options.context.tp = 1;
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<SoakSide> context,
                       SoakSide::Create(options, Role::kContext, SoakOptions{}));
  EXPECT_THAT(context->Execute(nlohmann::json{{"dance", true}})["error"].get<std::string>(),
              HasSubstr("unknown soak command"));
  nlohmann::json bad_batch = ToJson(PlanSoakBatch(options, SoakOptions{}, 1));
  bad_batch["fault_rank"] = 5;  // TP1: no rank 5
  EXPECT_THAT(context->Execute(nlohmann::json{{"batch", bad_batch}})["error"].get<std::string>(),
              HasSubstr("rank=5"));
}

}  // namespace
}  // namespace kvx::harness
