// Write bandwidth of a Transport backend, beside memcpy of the same bytes and a
// minimal libfabric write loop (the baseline the libfabric backend must stay within
// 90% of). Two endpoints in this process, 127.0.0.1 only.
//
//   bazel run -c opt //transport:bench -- --provider=tcp
//   bazel run -c opt //transport:bench -- --provider=shm --mode=baseline
//   bazel run -c opt //transport:bench -- --provider=loopback --buffer_bytes=268435456
//
// One row per size (fabtests' columns: bytes, iters, total, time, MB/sec, usec/xfer),
// then the same bytes copied by memcpy and the ratio. Sizes stream through the
// buffers; the "scatter" row writes --scatter_count pieces of --scatter_bytes at random
// offsets. Results on stdout, diagnostics on stderr; exit 1 with the status on error.

#include <rdma/fabric.h>
#include <rdma/fi_cm.h>
#include <rdma/fi_domain.h>
#include <rdma/fi_endpoint.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_rma.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <memory>
#include <random>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "transport/internal/random.h"
#include "transport/internal/sanitizers.h"
#include "transport/libfabric/libfabric_transport.h"
#include "transport/loopback/loopback_transport.h"
#include "transport/transport.h"

ABSL_FLAG(std::string, provider, "tcp", "loopback, tcp (tcp;ofi_rxm) or shm");
ABSL_FLAG(std::string, mode, "transport",
          "transport: the kvx backend; baseline: a minimal libfabric write loop");
ABSL_FLAG(std::string, sizes, "4096,65536,1048576,8388608", "message sizes in bytes");
ABSL_FLAG(int64_t, window, 64, "writes in flight");
ABSL_FLAG(uint64_t, bytes_per_size, uint64_t{1} << 30, "bytes written per size");
ABSL_FLAG(uint64_t, buffer_bytes, uint64_t{1} << 30, "size of each of the two buffers");
ABSL_FLAG(int64_t, scatter_count, 4096, "writes in the scattered case (0 skips it)");
ABSL_FLAG(uint64_t, scatter_bytes, 65536, "size of each scattered write");
ABSL_FLAG(int64_t, repeat, 3, "runs per row; the median is printed");
ABSL_FLAG(bool, baseline_own_thread, true,
          "baseline: run the write loop on its own thread while main waits, as the kvx "
          "owner thread does (false: on main; see README.md on 2-core placement)");
ABSL_FLAG(bool, baseline_unchecked_shm, false,
          "baseline on shm: ask for no RMA ordering, which takes shm's fast RMA path "
          "(the initiator copies straight into the target, no key check); kvx never "
          "uses it, so by default the baseline asks for kvx's ordering and its checks");
ABSL_FLAG(int64_t, idle_poll_us, 0,
          "libfabric endpoints: owner-thread sleep between polls when idle (0 spins)");

namespace kvx::transport {
namespace {

struct Write {
  uint64_t src_offset, dst_offset, length;
};

std::vector<Write> Streaming(uint64_t size, uint64_t total, uint64_t buffer) {
  std::vector<Write> writes;
  const uint64_t slots = std::max<uint64_t>(1, buffer / size);
  const uint64_t n = std::max<uint64_t>(1, total / size);
  for (uint64_t i = 0; i < n; ++i) writes.push_back({(i % slots) * size, (i % slots) * size, size});
  return writes;
}

std::vector<Write> Scattered(int64_t count, uint64_t size, uint64_t buffer) {
  std::mt19937_64 rng(42);
  std::uniform_int_distribution<uint64_t> at(0, (buffer - size) / 64);
  std::vector<Write> writes;
  for (int64_t i = 0; i < count; ++i) writes.push_back({at(rng) * 64, at(rng) * 64, size});
  return writes;
}

// Moves `writes` from src to dst once; returns the wall time it took.
using Runner = std::function<absl::StatusOr<absl::Duration>(const std::vector<Write>&)>;

absl::Duration Memcpy(char* dst, const char* src, const std::vector<Write>& writes) {
  const absl::Time start = absl::Now();
  for (const Write& w : writes) std::memcpy(dst + w.dst_offset, src + w.src_offset, w.length);
  return absl::Now() - start;
}

// --- kvx Transport ------------------------------------------------------------------
class TransportRunner {
 public:
  static absl::StatusOr<std::unique_ptr<TransportRunner>> Create(const std::string& provider,
                                                                 char* src, char* dst,
                                                                 uint64_t bytes) {
    auto r = std::unique_ptr<TransportRunner>(new TransportRunner());
    for (std::unique_ptr<Transport>* t : {&r->initiator_, &r->target_}) {
      absl::StatusOr<std::unique_ptr<Transport>> created;
      EndpointOptions endpoint;
      endpoint.peer_window = absl::GetFlag(FLAGS_window);
      if (provider == "loopback") {
        // Loopback needs no progress on the target: let idle endpoints sleep.
        created = CreateLoopbackTransport(endpoint);
      } else {
        LibfabricOptions options;
        options.provider = provider == "tcp" ? "tcp;ofi_rxm" : provider;
        options.node = "127.0.0.1";
        // Spin like the baseline's target thread by default: tcp and shm progress
        // manually, so the target endpoint must keep polling.
        endpoint.idle_poll_interval = absl::Microseconds(absl::GetFlag(FLAGS_idle_poll_us));
        options.endpoint = endpoint;
        created = CreateLibfabricTransport(options);
      }
      if (!created.ok()) return created.status();
      *t = *std::move(created);
    }
    absl::StatusOr<RegionId> s = r->initiator_->RegisterMemory(src, bytes);
    if (!s.ok()) return s.status();
    absl::StatusOr<RegionId> d = r->target_->RegisterMemory(dst, bytes);
    if (!d.ok()) return d.status();
    absl::StatusOr<PeerId> peer = r->initiator_->AddPeer(r->target_->address());
    if (!peer.ok()) return peer.status();
    absl::StatusOr<PeerId> writer = r->target_->AddPeer(r->initiator_->address());
    if (!writer.ok()) return writer.status();
    absl::StatusOr<RegionDescriptor> grant = r->target_->GrantRemoteWrite(*d, *writer);
    if (!grant.ok()) return grant.status();
    r->src_ = *s;
    r->dst_ = *grant;
    r->peer_ = *peer;
    return r;
  }

  absl::StatusOr<absl::Duration> Run(const std::vector<Write>& writes) {
    ops_.clear();
    for (const Write& w : writes) {
      ops_.push_back({src_, w.src_offset, dst_, w.dst_offset, w.length});
    }
    const absl::Time start = absl::Now();
    absl::StatusOr<TransferId> t = initiator_->PostWrites(peer_, ops_, start + absl::Minutes(5));
    if (!t.ok()) return t.status();
    absl::Status status = AwaitTransfer(*initiator_, *t, absl::InfiniteFuture());
    if (!status.ok()) return status;
    return absl::Now() - start;
  }

 private:
  TransportRunner() = default;
  std::unique_ptr<Transport> initiator_, target_;
  RegionId src_ = 0;
  RegionDescriptor dst_;
  PeerId peer_ = 0;
  std::vector<WriteOp> ops_;
};

// --- Minimal libfabric loop (baseline) ------------------------------------------------
absl::Status Check(const char* what, int64_t ret) {
  if (ret == 0) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ret=", ret, " (", fi_strerror(static_cast<int>(-ret)), ")"));
}

struct RawEndpoint {
  fi_info* info = nullptr;
  fid_fabric* fabric = nullptr;
  fid_domain* domain = nullptr;
  fid_cq* cq = nullptr;
  fid_av* av = nullptr;
  fid_ep* ep = nullptr;
  fid_mr* mr = nullptr;

  absl::Status Open(const std::string& provider, char* buf, uint64_t bytes, uint64_t key) {
    fi_info* hints = fi_allocinfo();
    hints->ep_attr->type = FI_EP_RDM;
    hints->caps = FI_RMA | FI_WRITE | FI_REMOTE_WRITE;
    hints->mode = FI_CONTEXT | FI_CONTEXT2;
    hints->domain_attr->mr_mode = FI_MR_LOCAL | FI_MR_VIRT_ADDR | FI_MR_ALLOCATED | FI_MR_PROV_KEY;
    hints->fabric_attr->prov_name = strdup(provider.c_str());
    const bool shm = provider == "shm";
    hints->addr_format = shm ? FI_ADDR_STR : FI_SOCKADDR_IN;
    if (shm && !absl::GetFlag(FLAGS_baseline_unchecked_shm)) {
      hints->tx_attr->msg_order = FI_ORDER_RAW | FI_ORDER_WAW;  // as kvx asks
    }
    // shm names an unnamed endpoint after the pid, so two of these in different PID
    // namespaces (two Bazel tests at once) would collide in /dev/shm; the transport
    // gives its own a random name for the same reason.
    const std::string node =
        shm ? absl::StrCat("kvx-bench-", absl::Hex(transport_internal::RandomKey(),
                                                   absl::kZeroPad16))
            : "127.0.0.1";
    int ret = fi_getinfo(FI_VERSION(1, 17), node.c_str(), nullptr, FI_SOURCE, hints, &info);
    fi_freeinfo(hints);
    if (absl::Status s = Check("fi_getinfo", ret); !s.ok()) return s;
    if (auto s = Check("fi_fabric", fi_fabric(info->fabric_attr, &fabric, nullptr)); !s.ok()) return s;
    if (auto s = Check("fi_domain", fi_domain(fabric, info, &domain, nullptr)); !s.ok()) return s;
    fi_cq_attr cq_attr = {};
    cq_attr.size = 1024;
    cq_attr.format = FI_CQ_FORMAT_CONTEXT;
    cq_attr.wait_obj = FI_WAIT_NONE;
    if (auto s = Check("fi_cq_open", fi_cq_open(domain, &cq_attr, &cq, nullptr)); !s.ok()) return s;
    fi_av_attr av_attr = {};
    av_attr.type = FI_AV_TABLE;
    if (auto s = Check("fi_av_open", fi_av_open(domain, &av_attr, &av, nullptr)); !s.ok()) return s;
    if (auto s = Check("fi_endpoint", fi_endpoint(domain, info, &ep, nullptr)); !s.ok()) return s;
    if (auto s = Check("bind av", fi_ep_bind(ep, &av->fid, 0)); !s.ok()) return s;
    if (auto s = Check("bind cq", fi_ep_bind(ep, &cq->fid, FI_TRANSMIT | FI_RECV)); !s.ok()) return s;
    if (auto s = Check("fi_enable", fi_enable(ep)); !s.ok()) return s;
    return Check("fi_mr_reg", fi_mr_reg(domain, buf, bytes, FI_WRITE | FI_REMOTE_WRITE, 0, key, 0,
                                        &mr, nullptr));
  }

  ~RawEndpoint() {
    for (fid* f : {ep ? &ep->fid : nullptr, mr ? &mr->fid : nullptr, av ? &av->fid : nullptr,
                   cq ? &cq->fid : nullptr, domain ? &domain->fid : nullptr,
                   fabric ? &fabric->fid : nullptr}) {
      if (f != nullptr) fi_close(f);
    }
    if (info != nullptr) fi_freeinfo(info);
  }
};

class BaselineRunner {
 public:
  static absl::StatusOr<std::unique_ptr<BaselineRunner>> Create(const std::string& provider,
                                                                char* src, char* dst,
                                                                uint64_t bytes) {
    auto r = std::unique_ptr<BaselineRunner>(new BaselineRunner());
    const std::string name = provider == "tcp" ? "tcp;ofi_rxm" : provider;
    if (auto s = r->a_.Open(name, src, bytes, 1); !s.ok()) return s;
    if (auto s = r->b_.Open(name, dst, bytes, 2); !s.ok()) return s;
    char addr[256];
    size_t len = sizeof(addr);
    if (auto s = Check("fi_getname", fi_getname(&r->b_.ep->fid, addr, &len)); !s.ok()) return s;
    if (fi_av_insert(r->a_.av, addr, 1, &r->peer_, 0, nullptr) != 1) {
      return absl::InternalError("fi_av_insert failed");
    }
    r->dst_base_ = (r->b_.info->domain_attr->mr_mode & FI_MR_VIRT_ADDR) ? reinterpret_cast<uint64_t>(dst) : 0;
    r->src_ = src;
    // The target must keep reading its CQ (manual progress).
    r->progress_ = std::thread([raw = r.get()] {
      fi_cq_entry e[16];
      while (!raw->stop_.load(std::memory_order_relaxed)) {
        if (fi_cq_read(raw->b_.cq, e, 16) == -FI_EAGAIN) sched_yield();
      }
    });
    return r;
  }

  ~BaselineRunner() {
    stop_ = true;
    if (progress_.joinable()) progress_.join();
  }

  absl::StatusOr<absl::Duration> Run(const std::vector<Write>& writes) {
    const int64_t window = absl::GetFlag(FLAGS_window);
    void* desc = fi_mr_desc(a_.mr);
    const uint64_t key = fi_mr_key(b_.mr);
    std::vector<fi_context2> contexts(writes.size());
    const absl::Time start = absl::Now();
    size_t posted = 0, done = 0;
    fi_cq_entry e[64];
    while (done < writes.size()) {
      while (posted < writes.size() && static_cast<int64_t>(posted - done) < window) {
        const Write& w = writes[posted];
        const ssize_t ret = fi_write(a_.ep, src_ + w.src_offset, w.length, desc, peer_,
                                     dst_base_ + w.dst_offset, key, &contexts[posted]);
        if (ret == -FI_EAGAIN) break;
        if (ret != 0) return Check("fi_write", ret);
        ++posted;
      }
      const ssize_t n = fi_cq_read(a_.cq, e, 64);
      if (n > 0) {
        done += static_cast<size_t>(n);
      } else if (n == -FI_EAGAIN) {
        sched_yield();
      } else {
        return Check("fi_cq_read", n);
      }
    }
    return absl::Now() - start;
  }

 private:
  BaselineRunner() = default;
  RawEndpoint a_, b_;
  fi_addr_t peer_ = 0;
  uint64_t dst_base_ = 0;
  char* src_ = nullptr;
  std::atomic<bool> stop_{false};
  std::thread progress_;
};

// --- Reporting ----------------------------------------------------------------------
void PrintRow(const std::string& label, const std::vector<Write>& writes,
              std::vector<absl::Duration> times, std::vector<absl::Duration> copies) {
  std::sort(times.begin(), times.end());
  std::sort(copies.begin(), copies.end());
  const absl::Duration t = times[times.size() / 2];
  const absl::Duration c = copies[copies.size() / 2];
  uint64_t total = 0;
  for (const Write& w : writes) total += w.length;
  const double secs = absl::ToDoubleSeconds(t);
  const double mbps = total / secs / 1e6;
  const double copy_mbps = total / absl::ToDoubleSeconds(c) / 1e6;
  std::printf("%-10s %10llu %8zu %10s %9.3fs %10.1f %10.2f %12.1f %6.2f\n", label.c_str(),
              static_cast<unsigned long long>(writes[0].length), writes.size(),
              absl::StrCat(total >> 20, "m").c_str(), secs, mbps,
              secs * 1e6 / writes.size(), copy_mbps, mbps / copy_mbps);
}

absl::Status Main() {
  const std::string provider = absl::GetFlag(FLAGS_provider);
  const std::string mode = absl::GetFlag(FLAGS_mode);
  if (provider == "shm" && transport_internal::kThreadSanitizer) {
    return absl::UnavailableError(
        "shm is not run under ThreadSanitizer: libfabric 1.17's shm crashes or hangs there");
  }
  const uint64_t buffer = absl::GetFlag(FLAGS_buffer_bytes);
  std::vector<uint64_t> sizes;
  for (absl::string_view s : absl::StrSplit(absl::GetFlag(FLAGS_sizes), ',')) {
    uint64_t v = 0;
    if (!absl::SimpleAtoi(s, &v) || v == 0 || v > buffer) {
      return absl::InvalidArgumentError(absl::StrCat("bad size: ", s, " buffer_bytes=", buffer));
    }
    sizes.push_back(v);
  }
  // Touched up front so page faults are not timed. memcpy gets its own destination:
  // the target endpoint writes `dst` from its own thread, synchronized with us only
  // through the network, which ThreadSanitizer cannot see.
  std::vector<char> src(buffer, 's'), dst(buffer, 'd'), copy_dst(buffer, 'c');
  Runner run;
  std::unique_ptr<TransportRunner> transport;
  std::unique_ptr<BaselineRunner> baseline;
  if (mode == "transport") {
    absl::StatusOr<std::unique_ptr<TransportRunner>> r =
        TransportRunner::Create(provider, src.data(), dst.data(), buffer);
    if (!r.ok()) return r.status();
    transport = *std::move(r);
    run = [&](const std::vector<Write>& w) { return transport->Run(w); };
  } else if (mode == "baseline" && provider != "loopback") {
    absl::StatusOr<std::unique_ptr<BaselineRunner>> r =
        BaselineRunner::Create(provider, src.data(), dst.data(), buffer);
    if (!r.ok()) return r.status();
    baseline = *std::move(r);
    run = [&](const std::vector<Write>& w) -> absl::StatusOr<absl::Duration> {
      if (!absl::GetFlag(FLAGS_baseline_own_thread)) return baseline->Run(w);
      absl::StatusOr<absl::Duration> result;
      std::thread loop([&] { result = baseline->Run(w); });
      loop.join();
      return result;
    };
  } else {
    return absl::InvalidArgumentError(absl::StrCat("bad mode/provider: mode=", mode, " provider=", provider));
  }
  std::printf("# provider=%s mode=%s%s window=%lld buffer_bytes=%llu\n", provider.c_str(),
              mode.c_str(),
              mode == "baseline" && !absl::GetFlag(FLAGS_baseline_own_thread) ? " (on main)" : "",
              static_cast<long long>(absl::GetFlag(FLAGS_window)),
              static_cast<unsigned long long>(buffer));
  std::printf("%-10s %10s %8s %10s %10s %10s %10s %12s %6s\n", "case", "bytes", "iters",
              "total", "time", "MB/sec", "usec/xfer", "memcpy_MB/s", "ratio");
  std::vector<std::pair<std::string, std::vector<Write>>> rows;
  for (uint64_t size : sizes) {
    rows.push_back({"stream", Streaming(size, absl::GetFlag(FLAGS_bytes_per_size), buffer)});
  }
  const uint64_t scatter_bytes = absl::GetFlag(FLAGS_scatter_bytes);
  if (absl::GetFlag(FLAGS_scatter_count) > 0 && scatter_bytes <= buffer) {
    rows.push_back({"scatter", Scattered(absl::GetFlag(FLAGS_scatter_count), scatter_bytes, buffer)});
  }
  for (const auto& [label, writes] : rows) {
    absl::StatusOr<absl::Duration> warm = run(writes);  // Connects, warms caches.
    if (!warm.ok()) return warm.status();
    std::vector<absl::Duration> times, copies;
    for (int64_t i = 0; i < std::max<int64_t>(1, absl::GetFlag(FLAGS_repeat)); ++i) {
      absl::StatusOr<absl::Duration> t = run(writes);
      if (!t.ok()) return t.status();
      times.push_back(*t);
      copies.push_back(Memcpy(copy_dst.data(), src.data(), writes));
    }
    PrintRow(label, writes, times, copies);
  }
  return absl::OkStatus();
}

}  // namespace
}  // namespace kvx::transport

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Transport write bandwidth against memcpy and a minimal libfabric loop.\n"
      "  bazel run -c opt //transport:bench -- --provider=tcp\n"
      "  bazel run -c opt //transport:bench -- --provider=shm --mode=baseline\n"
      "  bazel run -c opt //transport:bench -- --provider=loopback");
  absl::ParseCommandLine(argc, argv);
  absl::Status status = kvx::transport::Main();
  if (!status.ok()) {
    std::fprintf(stderr, "bench: %s\n", status.ToString().c_str());
    return 1;
  }
  return 0;
}
