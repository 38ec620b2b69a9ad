// tandem-transfer-bench: UCX put bandwidth between two processes (fork), for plain messages of 64 KiB..64 MiB
// and for the state of one DSV4-Flash request (8K-token prompt: C4/indexer/C128 pages per layer, window
// and compressor rings), with decode's pages contiguous or scattered. Prints a table and writes CSV.
//   tandem-transfer-bench --tls tcp|sm|<UCX_TLS> [--csv FILE] [--sizes 65536,...] [--prompt-tokens 8192] [--volume BYTES]
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <cstdio>
#include <fstream>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/transfer/ucx_transport.h"
#include "common/transfer/socket.h"
#include "common/transfer/wire.h"

using namespace tandem::transfer;

namespace {

constexpr uint64_t kMessageBytes = 64ull << 20;
constexpr uint64_t kPageTokens = 256;

// One pool of the DSV4-Flash stage, layer-major [layer][page][page_bytes] (common/cache/pools.h).
struct Pool {
  const char* name;
  uint64_t layers;
  uint64_t page_bytes;
  bool per_token_page;  // false: one page/slot per request (window, rings)
};
// reference/dsv4-model.md §3.5: C4 page 37440 B / 256 tokens; indexer 64 keys x 132 B; C128 page 1728 B;
// window 128 x 584 B per layer; rings: C4 8 x 8192 B, C4 indexer 8 x 2048 B, C128 128 x 4096 B.
const Pool kPools[] = {{"c4_kv", 21, 37440, true},       {"c4_indexer", 21, 8448, true},
                       {"c128_kv", 20, 1728, true},      {"window_kv", 43, 128 * 584, false},
                       {"c4_state", 21, 8 * 8192, false}, {"c4_indexer_state", 21, 8 * 2048, false},
                       {"c128_state", 20, 128 * 4096, false}};
constexpr uint64_t kPoolPages = 80;  // token pages per pool (an 8K prompt needs 32)
constexpr uint64_t kPoolSlots = 4;   // window/ring slots per pool

// Every region lives in memory the transport allocated, as the engine's pools do (StatePools with the
// transport's RegionAllocator): shared memory the peer can map, where the sm transports are in use.
struct Regions {
  absl::Status Register(KvTransport& t) {
    std::vector<uint64_t> sizes = {kMessageBytes};
    for (const Pool& p : kPools) sizes.push_back(p.layers * (p.per_token_page ? kPoolPages : kPoolSlots) * p.page_bytes);
    const char* names[] = {"messages", "c4_kv", "c4_indexer", "c128_kv", "window_kv", "c4_state", "c4_indexer_state", "c128_state"};
    for (size_t i = 0; i < sizes.size(); ++i) {
      auto memory = t.AllocateRegion(sizes[i]);
      if (!memory.ok()) return memory.status();
      std::memset(*memory, i == 0 ? 1 : 2, sizes[i]);
      auto r = t.RegisterRegion({names[i], *memory, sizes[i]});
      if (!r.ok()) return r.status();
    }
    return absl::OkStatus();
  }
};

// The request's segments in canonical order (pool, layer, page), with the given token page ids and slot.
std::vector<Segment> RequestSegments(const std::vector<uint64_t>& pages, uint64_t slot) {
  std::vector<Segment> out;
  for (size_t p = 0; p < std::size(kPools); ++p) {
    const Pool& pool = kPools[p];
    const uint64_t per_layer = pool.per_token_page ? kPoolPages : kPoolSlots;
    for (uint64_t layer = 0; layer < pool.layers; ++layer) {
      if (pool.per_token_page) {
        for (uint64_t page : pages) out.push_back({static_cast<uint32_t>(p + 1), (layer * per_layer + page) * pool.page_bytes, pool.page_bytes});
      } else {
        out.push_back({static_cast<uint32_t>(p + 1), (layer * per_layer + slot) * pool.page_bytes, pool.page_bytes});
      }
    }
  }
  return out;
}

int Target(int fd, const std::string& tls) {
  UcxOptions options;
  options.tls = tls;
  auto transport = UcxTransport::Create(options);
  if (!transport.ok()) {
    std::fprintf(stderr, "target: %s\n", transport.status().ToString().c_str());
    return 1;
  }
  Regions regions;
  if (auto s = regions.Register(**transport); !s.ok()) {
    std::fprintf(stderr, "target: %s\n", s.ToString().c_str());
    return 1;
  }
  Handshake h;
  h.transport_address = *(*transport)->LocalAddress();
  h.regions = (*transport)->DescribeRegions();
  const std::string frame = EncodeFrame(FrameType::kHello, Encode(h));
  if (!WriteAll(fd, frame, Clock::now() + std::chrono::seconds(10)).ok()) return 1;
  char byte;
  [[maybe_unused]] ssize_t n = ::read(fd, &byte, 1);  // the initiator is done (or died)
  return 0;
}

struct Row {
  std::string transport, kind;
  uint64_t bytes = 0, segments = 0, puts = 0, iterations = 0;
  double seconds = 0;
  double mib_per_s() const { return bytes * iterations / seconds / (1024.0 * 1024.0); }
};

Row Measure(UcxTransport& t, PeerId peer, const std::string& tls, const std::string& kind, const std::vector<Segment>& src,
            const std::vector<Segment>& dst, uint64_t iterations) {
  for (int i = 0; i < 2; ++i) (void)t.Put(peer, src, dst);  // warm-up: registration caches, wireup
  const uint64_t puts_before = t.stats().puts_issued;
  const auto start = Clock::now();
  for (uint64_t i = 0; i < iterations; ++i) {
    if (auto s = t.Put(peer, src, dst); !s.ok()) {
      std::fprintf(stderr, "put: %s\n", s.ToString().c_str());
      std::exit(1);
    }
  }
  Row row{tls, kind};
  row.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  for (const Segment& s : src) row.bytes += s.length;
  row.segments = src.size();
  row.puts = (t.stats().puts_issued - puts_before) / iterations;
  row.iterations = iterations;
  return row;
}

int Initiator(int fd, const std::string& tls, const std::string& name, const std::vector<uint64_t>& sizes, uint64_t prompt_tokens,
              uint64_t volume, const std::string& csv) {
  UcxOptions options;
  options.tls = tls;
  auto transport = UcxTransport::Create(options);
  if (!transport.ok()) {
    std::fprintf(stderr, "initiator: %s\n", transport.status().ToString().c_str());
    return 1;
  }
  Regions regions;
  if (auto s = regions.Register(**transport); !s.ok()) {
    std::fprintf(stderr, "initiator: %s\n", s.ToString().c_str());
    return 1;
  }
  auto frame = ReadFrame(fd, Clock::now() + std::chrono::seconds(30), 1 << 24);
  if (!frame.ok()) return 1;
  auto peer_info = DecodeHandshake(frame->second);
  if (!peer_info.ok()) return 1;
  auto peer = (*transport)->Connect(peer_info->transport_address, peer_info->regions);
  if (!peer.ok()) {
    std::fprintf(stderr, "connect: %s\n", peer.status().ToString().c_str());
    return 1;
  }
  std::vector<Row> rows;
  for (uint64_t size : sizes) {
    const std::vector<Segment> one = {{0, 0, size}};
    const uint64_t iterations = std::clamp<uint64_t>(volume / size, 20, 5000);  // run.sh gives ucx_perftest the same
    rows.push_back(Measure(**transport, *peer, name, "message", one, one, iterations));
  }
  const uint64_t pages = (prompt_tokens + kPageTokens - 1) / kPageTokens;
  std::vector<uint64_t> source_pages(pages), scattered(pages);
  std::iota(source_pages.begin(), source_pages.end(), 0);
  std::iota(scattered.begin(), scattered.end(), 0);
  std::vector<uint64_t> all(kPoolPages);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), std::mt19937(3));
  std::copy_n(all.begin(), pages, scattered.begin());
  const auto src = RequestSegments(source_pages, 0);
  rows.push_back(Measure(**transport, *peer, name, "request_contiguous", src, RequestSegments(source_pages, 1), 40));
  rows.push_back(Measure(**transport, *peer, name, "request_scattered", src, RequestSegments(scattered, 2), 40));
  (void)(*transport)->Disconnect(*peer);

  std::printf("%-6s %-20s %12s %9s %6s %10s %12s\n", "tls", "kind", "bytes", "segments", "puts", "ms/iter", "MiB/s");
  for (const Row& r : rows) {
    std::printf("%-6s %-20s %12llu %9llu %6llu %10.3f %12.1f\n", r.transport.c_str(), r.kind.c_str(),
                static_cast<unsigned long long>(r.bytes), static_cast<unsigned long long>(r.segments),
                static_cast<unsigned long long>(r.puts), 1e3 * r.seconds / r.iterations, r.mib_per_s());
  }
  if (!csv.empty()) {
    const bool fresh = !std::ifstream(csv).good();
    std::ofstream out(csv, std::ios::app);
    if (fresh) out << "source,transport,kind,bytes,segments,puts,iterations,seconds,mib_per_s\n";
    for (const Row& r : rows) {
      out << "tandem," << r.transport << "," << r.kind << "," << r.bytes << "," << r.segments << "," << r.puts << ","
          << r.iterations << "," << r.seconds << "," << r.mib_per_s() << "\n";
    }
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  std::string tls = "tcp", csv;
  std::vector<uint64_t> sizes;
  uint64_t prompt_tokens = 8192;
  uint64_t volume = 2ull << 30;  // bytes per message size
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "tandem-transfer-bench: %s needs a value\n", arg.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (arg == "--tls") {
      tls = value();
    } else if (arg == "--csv") {
      csv = value();
    } else if (arg == "--prompt-tokens") {
      prompt_tokens = std::stoull(value());
    } else if (arg == "--volume") {
      volume = std::stoull(value());
    } else if (arg == "--sizes") {
      std::string list = value();
      size_t start = 0;
      while (start < list.size()) {
        size_t end = list.find(',', start);
        if (end == std::string::npos) end = list.size();
        sizes.push_back(std::stoull(list.substr(start, end - start)));
        start = end + 1;
      }
    } else if (arg == "--help" || arg == "-h") {
      std::printf("usage: tandem-transfer-bench [--tls tcp|sm|UCX_TLS] [--csv FILE] [--sizes B,B,...] [--prompt-tokens N] [--volume BYTES]\n");
      return 0;
    } else {
      std::fprintf(stderr, "tandem-transfer-bench: unknown flag %s (see --help)\n", arg.c_str());
      return 2;
    }
  }
  const std::string name = tls;  // what the CSV calls it
  if (tls == "sm") tls = "self,sm";
  if (sizes.empty()) {
    for (uint64_t s = 64 << 10; s <= kMessageBytes; s *= 4) sizes.push_back(s);
  }
  for (uint64_t s : sizes) {
    if (s == 0 || s > kMessageBytes) {
      std::fprintf(stderr, "tandem-transfer-bench: sizes must be in (0, %llu]\n", static_cast<unsigned long long>(kMessageBytes));
      return 2;
    }
  }
  if (prompt_tokens == 0 || prompt_tokens > kPoolPages * kPageTokens) {
    std::fprintf(stderr, "tandem-transfer-bench: --prompt-tokens must be in [1, %llu]\n", static_cast<unsigned long long>(kPoolPages * kPageTokens));
    return 2;
  }
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM, 0, fds) != 0) return 1;
  // Fork before any UCX or thread exists in this process.
  const pid_t child = ::fork();
  if (child == 0) {
    ::close(fds[0]);
    std::_Exit(Target(fds[1], tls));
  }
  ::close(fds[1]);
  const int rc = Initiator(fds[0], tls, name, sizes, prompt_tokens, volume, csv);
  ::close(fds[0]);  // releases the target
  int status = 0;
  ::waitpid(child, &status, 0);
  return rc;
}
