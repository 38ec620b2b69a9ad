// Helper process for the two-process transfer tests: plays prefill or decode over UCX in its own process.
//   transfer_peer prefill <tls> <port-file> <room> <pages> [hang]   serve one room (hang: stop after the destination)
//   transfer_peer decode <tls> <port> <room> <pages> <ready-file>    register one room, then hang
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "common/transfer/checksum.h"
#include "common/transfer/ucx_transport.h"
#include "tests/unit/transfer/test_util.h"

using namespace tandem::transfer;
using namespace std::chrono_literals;

namespace {
constexpr uint64_t kPage = 37440;

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "transfer_peer: %s\n", status.ToString().c_str());
  return 1;
}

void WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  std::ofstream(tmp) << text;
  std::rename(tmp.c_str(), path.c_str());
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 6) return 2;
  const std::string role = argv[1];
  UcxOptions ucx;
  ucx.tls = argv[2];
  const RoomId room = std::stoull(argv[4]);
  const size_t pages = std::stoul(argv[5]);
  auto transport = UcxTransport::Create(ucx);
  if (!transport.ok()) return Fail(transport.status());
  if (role == "prefill") {
    auto src = testing::RegisterBuffer(**transport, "c4_kv", 64 * kPage, 7);
    auto agent = PrefillAgent::Create(transport->get(), testing::TestHandshake(), testing::FastOptions(), "127.0.0.1", 0);
    if (!agent.ok()) return Fail(agent.status());
    testing::DoneRecorder done;
    if (auto s = (*agent)->ExpectRoom(room, done.Callback()); !s.ok()) return Fail(s);
    WriteFileAtomically(argv[3], std::to_string((*agent)->port()));
    auto destination = (*agent)->WaitDestination(room, 20s);
    if (!destination.ok()) return Fail(destination.status());
    if (argc > 6 && std::string(argv[6]) == "hang") {
      WriteFileAtomically(std::string(argv[3]) + ".ready", "1");
      for (;;) std::this_thread::sleep_for(1s);
    }
    auto segments = testing::PageSegments(src.region, pages, kPage, 1, 0);
    for (size_t first = 0; first < pages; first += 4) {
      const size_t n = std::min<size_t>(4, pages - first);
      if (auto s = (*agent)->Ship(room, first, std::span(segments).subspan(first, n)); !s.ok()) return Fail(s);
    }
    auto checksum = ChecksumSegments((*transport)->regions(), segments);
    if (!checksum.ok()) return Fail(checksum.status());
    if (auto s = (*agent)->Complete(room, Completion{11, *checksum, "extra"}); !s.ok()) return Fail(s);
    auto final = done.Wait(room, 20s);
    if (!final) return Fail(absl::DeadlineExceededError("no ack"));
    return final->ok() ? 0 : Fail(*final);
  }
  if (role == "decode") {
    if (argc < 7) return 2;
    auto dst = testing::RegisterBuffer(**transport, "c4_kv", 64 * kPage, 0);
    auto agent = DecodeAgent::Create(transport->get(), testing::TestHandshake(), testing::FastOptions());
    if (!agent.ok()) return Fail(agent.status());
    testing::DoneRecorder done;
    auto s = (*agent)->Register(room, "127.0.0.1", static_cast<uint16_t>(std::stoul(argv[3])),
                                testing::PageSegments(dst.region, pages, kPage, 2, 0), done.Callback());
    if (!s.ok()) return Fail(s);
    WriteFileAtomically(argv[6], "1");
    for (;;) std::this_thread::sleep_for(1s);
  }
  return 2;
}
