#include "common/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <random>
#include <string>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

namespace tandem::model {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::vector<uint8_t> RandomBytes(size_t size, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> bytes(size);
  for (auto& byte : bytes) byte = static_cast<uint8_t>(rng());
  return bytes;
}

Tensor RandomTensor(DType dtype, std::vector<int64_t> shape, uint32_t seed) {
  Tensor tensor(dtype, std::move(shape));
  const std::vector<uint8_t> bytes = RandomBytes(tensor.bytes(), seed);
  if (!bytes.empty()) std::memcpy(tensor.data(), bytes.data(), bytes.size());
  return tensor;
}

std::vector<uint8_t> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
}

// A file from a hand-written header: u64 length, header text, data bytes.
void WriteRaw(const std::string& path, const std::string& header, const std::vector<uint8_t>& data,
              uint64_t header_length_override = 0) {
  const uint64_t length = header_length_override ? header_length_override : header.size();
  std::vector<uint8_t> bytes(8);
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<uint8_t>(length >> (8 * i));
  bytes.insert(bytes.end(), header.begin(), header.end());
  bytes.insert(bytes.end(), data.begin(), data.end());
  WriteFile(path, bytes);
}

// Pages of the file currently in the page cache, measured through a fresh mapping.
size_t ResidentPages(const std::string& path, size_t* total_pages) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  struct stat st {};
  ::fstat(fd, &st);
  const size_t size = static_cast<size_t>(st.st_size);
  void* mapping = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);
  const size_t page = static_cast<size_t>(::sysconf(_SC_PAGESIZE));
  std::vector<unsigned char> residency((size + page - 1) / page);
  ::mincore(mapping, size, residency.data());
  ::munmap(mapping, size);
  size_t resident = 0;
  for (unsigned char flag : residency) resident += flag & 1;
  *total_pages = residency.size();
  return resident;
}

void SyncFile(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  ::fsync(fd);
  ::close(fd);
}

class SafetensorsTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = testing::TempDir() + "safetensors_test_" + std::to_string(::getpid()) + "_" +
           testing::UnitTest::GetInstance()->current_test_info()->name();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::string Path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // Opens `header` + `data` as a file and returns the error text (empty when it opened).
  std::string OpenError(const std::string& header, const std::vector<uint8_t>& data) {
    WriteRaw(Path("t.safetensors"), header, data);
    auto file = SafetensorsFile::Open(Path("t.safetensors"));
    return file.ok() ? "" : std::string(file.status().message());
  }

  CheckpointOptions Quiet(bool drop_cache = false) {
    CheckpointOptions options;
    options.show_progress = false;
    options.drop_cache_after_load = drop_cache;
    return options;
  }

  std::string dir_;
};

constexpr char kTwoF32[] =
    R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})";

TEST_F(SafetensorsTest, RoundTripsSeveralDtypes) {
  struct Case {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
  };
  const std::vector<Case> cases = {
      {"layers.0.attn.wq_a.weight", DType::kF8E4M3, {4, 8}},
      {"layers.0.attn.wq_a.scale", DType::kF8E8M0, {2, 2}},
      {"layers.0.ffn.experts.0.w1.weight", DType::kI8, {3, 5}},
      {"embed.weight", DType::kBF16, {2, 3}},
      {"norm.weight", DType::kF32, {4}},
      {"layers.0.ffn.gate.tid2eid", DType::kI64, {2}},
      {"empty", DType::kF32, {0, 3}},
      {"scalar", DType::kF32, {}},
  };
  SafetensorsWriter writer;
  std::vector<Tensor> originals;
  for (size_t i = 0; i < cases.size(); ++i) {
    originals.push_back(RandomTensor(cases[i].dtype, cases[i].shape, static_cast<uint32_t>(i)));
    writer.Add(cases[i].name, originals.back());
  }
  EXPECT_EQ(writer.names().size(), cases.size());
  EXPECT_EQ(writer.pending_bytes(), 32u + 4 + 15 + 12 + 16 + 16 + 0 + 4);
  ASSERT_TRUE(writer.Write(Path("model.safetensors"), {{"format", "pt"}}).ok());
  EXPECT_EQ(writer.pending_bytes(), 0u);

  const std::vector<uint8_t> raw = ReadFile(Path("model.safetensors"));
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | raw[i];
  EXPECT_EQ(header_length % 8, 0u);

  auto file = SafetensorsFile::Open(Path("model.safetensors"));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  EXPECT_EQ((*file)->file_size(), raw.size());
  uint64_t expected_begin = 0;
  for (size_t i = 0; i < cases.size(); ++i) {
    const TensorInfo& info = (*file)->tensors().at(cases[i].name);
    EXPECT_EQ(info.dtype, cases[i].dtype);
    EXPECT_EQ(info.shape, cases[i].shape);
    EXPECT_EQ(info.begin, expected_begin) << "data is laid out in Add order";
    expected_begin = info.end;
    auto data = (*file)->Data(cases[i].name);
    ASSERT_TRUE(data.ok());
    EXPECT_TRUE(std::equal(data->begin(), data->end(), originals[i].raw().begin(), originals[i].raw().end()));
  }
  EXPECT_THAT(std::string((*file)->Data("nope").status().message()), HasSubstr("tensor nope missing"));
  (*file)->Unmap(false);
  EXPECT_FALSE((*file)->mapped());
  EXPECT_THAT(std::string((*file)->Data("norm.weight").status().message()), HasSubstr("no longer mapped"));

  auto checkpoint = Checkpoint::Open(dir_, Quiet());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->total_bytes(), expected_begin);
  for (size_t i = 0; i < cases.size(); ++i) {
    auto tensor = (*checkpoint)->Load(cases[i].name, cases[i].dtype, cases[i].shape);
    ASSERT_TRUE(tensor.ok()) << tensor.status();
    EXPECT_EQ(tensor->shape(), cases[i].shape);
    EXPECT_TRUE(
        std::equal(tensor->raw().begin(), tensor->raw().end(), originals[i].raw().begin(), originals[i].raw().end()));
  }
  // Every tensor consumed: the shard is released, so a second load is refused rather than read.
  EXPECT_THAT(std::string((*checkpoint)->Load("norm.weight", DType::kF32, {4}).status().message()),
              HasSubstr("shard already released"));
}

TEST_F(SafetensorsTest, AcceptsPaddedHeader) {
  const std::string header = std::string(kTwoF32) + std::string(13, ' ');
  EXPECT_EQ(OpenError(header, RandomBytes(16, 1)), "");
}

TEST_F(SafetensorsTest, RejectsFileCutInsideHeader) {
  WriteRaw(Path("full.safetensors"), kTwoF32, RandomBytes(16, 1));
  std::vector<uint8_t> bytes = ReadFile(Path("full.safetensors"));
  bytes.resize(8 + 20);
  WriteFile(Path("cut.safetensors"), bytes);
  auto file = SafetensorsFile::Open(Path("cut.safetensors"));
  ASSERT_FALSE(file.ok());
  EXPECT_THAT(std::string(file.status().message()), HasSubstr(Path("cut.safetensors") + ": header length"));
  EXPECT_THAT(std::string(file.status().message()), HasSubstr("runs past the end of the 28-byte file"));

  bytes.resize(5);
  WriteFile(Path("tiny.safetensors"), bytes);
  EXPECT_THAT(std::string(SafetensorsFile::Open(Path("tiny.safetensors")).status().message()),
              HasSubstr("file is 5 bytes, too short for the 8-byte header length"));
}

TEST_F(SafetensorsTest, RejectsFileCutInsideData) {
  const std::string message = OpenError(kTwoF32, RandomBytes(12, 1));
  EXPECT_THAT(message, HasSubstr(Path("t.safetensors") + ": tensor b: data_offsets [8, 16] run past the end of the "
                                                         "data buffer (12 bytes; file truncated?)"));
}

TEST_F(SafetensorsTest, RejectsHeaderLengthLargerThanFile) {
  WriteRaw(Path("t.safetensors"), kTwoF32, RandomBytes(16, 1), /*header_length_override=*/4096);
  EXPECT_THAT(std::string(SafetensorsFile::Open(Path("t.safetensors")).status().message()),
              HasSubstr("header length 4096 runs past the end"));
  WriteRaw(Path("t.safetensors"), kTwoF32, RandomBytes(16, 1), /*header_length_override=*/(100ull << 20) + 1);
  EXPECT_THAT(std::string(SafetensorsFile::Open(Path("t.safetensors")).status().message()),
              HasSubstr("header length 104857601 exceeds the 100 MiB limit"));
}

TEST_F(SafetensorsTest, RejectsBadJson) {
  EXPECT_THAT(OpenError(R"({"a":{"dtype":"F32",)", {}), HasSubstr(": header is not valid JSON"));
  EXPECT_THAT(OpenError("", {}), HasSubstr(": header is not valid JSON"));
}

TEST_F(SafetensorsTest, RejectsNonObjectJson) {
  EXPECT_THAT(OpenError("[1, 2]", {}), HasSubstr(": header JSON is array, expected an object"));
  EXPECT_THAT(OpenError(R"({"a": 3})", {}), HasSubstr("tensor a: header entry is not an object"));
  EXPECT_THAT(OpenError(R"({"a": {"dtype": "F32"}})", {}), HasSubstr("tensor a: header entry needs dtype, shape"));
  EXPECT_THAT(OpenError(R"({"__metadata__": {"k": 1}})", {}),
              HasSubstr("__metadata__ value for \"k\" is not a string"));
}

TEST_F(SafetensorsTest, RejectsNonUtf8Header) {
  const std::string bad_byte = "{\"w\xff\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  EXPECT_THAT(OpenError(bad_byte, RandomBytes(4, 1)), HasSubstr(": header is not valid UTF-8 (byte 3 of the header)"));
  const std::string overlong = "{\"w\xc0\xaf\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  EXPECT_THAT(OpenError(overlong, RandomBytes(4, 1)), HasSubstr("not valid UTF-8"));
  const std::string valid = "{\"w\xc3\xa9\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}}";
  EXPECT_EQ(OpenError(valid, RandomBytes(4, 1)), "");
}

TEST_F(SafetensorsTest, RejectsUnknownDtype) {
  EXPECT_THAT(OpenError(R"({"w":{"dtype":"F7","shape":[1],"data_offsets":[0,1]}})", {0}),
              HasSubstr(Path("t.safetensors") + ": tensor w: unknown dtype \"F7\""));
}

TEST_F(SafetensorsTest, RejectsNegativeOrNonIntegerShape) {
  EXPECT_THAT(OpenError(R"({"w":{"dtype":"F32","shape":[-1,2],"data_offsets":[0,8]}})", RandomBytes(8, 1)),
              HasSubstr("tensor w: shape must be a list of non-negative integers, got [-1,2]"));
  EXPECT_THAT(OpenError(R"({"w":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}})", RandomBytes(8, 1)),
              HasSubstr("tensor w: shape must be a list of non-negative integers"));
  EXPECT_THAT(OpenError(R"({"w":{"dtype":"F32","shape":"2","data_offsets":[0,8]}})", RandomBytes(8, 1)),
              HasSubstr("tensor w: shape must be a list of non-negative integers"));
  EXPECT_THAT(OpenError(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,-8]}})", RandomBytes(8, 1)),
              HasSubstr("tensor w: data_offsets must be two non-negative integers"));
}

TEST_F(SafetensorsTest, RejectsDtypeSizeMismatch) {
  EXPECT_THAT(
      OpenError(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", RandomBytes(20, 1)),
      HasSubstr(Path("t.safetensors") + ": tensor w: dtype F32 x shape [2, 3] = 24 bytes but data_offsets span 20"));
  EXPECT_THAT(
      OpenError(R"({"w":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,8]}})", RandomBytes(8, 1)),
      HasSubstr("tensor w: dtype F64 x shape [4294967296, 4294967296] overflows 64 bits"));
}

TEST_F(SafetensorsTest, RejectsOffsetsOutOfRange) {
  EXPECT_THAT(OpenError(R"({"w":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}})", RandomBytes(16, 1)),
              HasSubstr("tensor w: data_offsets [0, 24] run past the end of the data buffer (16 bytes"));
  EXPECT_THAT(OpenError(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[9,8]}})", {}),
              HasSubstr("tensor w: data_offsets [9, 8] end before they begin"));
}

TEST_F(SafetensorsTest, RejectsOverlappingOffsets) {
  EXPECT_THAT(OpenError(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                        RandomBytes(12, 1)),
              HasSubstr("tensor b: data_offsets [4, 12] overlap tensor a [0, 8]"));
}

TEST_F(SafetensorsTest, RejectsHoleBetweenTensors) {
  EXPECT_THAT(OpenError(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                        R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                        RandomBytes(20, 1)),
              HasSubstr("tensor b: hole of 4 unused bytes in the data buffer [8, 12] after tensor a"));
  EXPECT_THAT(OpenError(R"({"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", RandomBytes(12, 1)),
              HasSubstr("tensor b: hole of 4 unused bytes in the data buffer [0, 4] before it"));
  EXPECT_THAT(OpenError(kTwoF32, RandomBytes(20, 1)),
              HasSubstr("hole of 4 unused bytes at the end of the data buffer [16, 20] after tensor b"));
}

TEST_F(SafetensorsTest, CheckpointReportsMissingTensor) {
  WriteRaw(Path("model.safetensors"), kTwoF32, RandomBytes(16, 1));
  auto checkpoint = Checkpoint::Open(dir_, Quiet());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_FALSE((*checkpoint)->Has("layers.0.attn.wkv.weight"));
  const absl::Status status = (*checkpoint)->Load("layers.0.attn.wkv.weight", DType::kF32, {2}).status();
  EXPECT_EQ(status.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(std::string(status.message()), HasSubstr(dir_ + ": tensor layers.0.attn.wkv.weight missing"));
}

TEST_F(SafetensorsTest, CheckpointRejectsWrongShape) {
  SafetensorsWriter writer;
  writer.Add("w", RandomTensor(DType::kF32, {4, 8}, 1));
  ASSERT_TRUE(writer.Write(Path("model.safetensors")).ok());
  auto checkpoint = Checkpoint::Open(dir_, Quiet());
  ASSERT_TRUE(checkpoint.ok());
  EXPECT_THAT(std::string((*checkpoint)->Load("w", DType::kF32, {8, 4}).status().message()),
              HasSubstr("model.safetensors: tensor w: expected dtype F32 shape [8, 4], found F32 [4, 8]"));
}

TEST_F(SafetensorsTest, CheckpointRejectsWrongDtype) {
  SafetensorsWriter writer;
  writer.Add("w", RandomTensor(DType::kF32, {4, 8}, 1));
  ASSERT_TRUE(writer.Write(Path("model.safetensors")).ok());
  auto checkpoint = Checkpoint::Open(dir_, Quiet());
  ASSERT_TRUE(checkpoint.ok());
  EXPECT_THAT(std::string((*checkpoint)->Load("w", DType::kBF16, {4, 8}).status().message()),
              HasSubstr("tensor w: expected dtype BF16 shape [4, 8], found F32 [4, 8]"));
}

TEST_F(SafetensorsTest, IndexPointingAtShardWithoutTheTensorIsAnError) {
  SafetensorsWriter writer;
  writer.Add("a", RandomTensor(DType::kF32, {2}, 1));
  ASSERT_TRUE(writer.Write(Path("first.safetensors")).ok());
  writer.Add("b", RandomTensor(DType::kF32, {2}, 2));
  ASSERT_TRUE(writer.Write(Path("second.safetensors")).ok());
  std::ofstream(Path("model.safetensors.index.json"))
      << R"({"metadata":{"total_size":16},"weight_map":{"a":"first.safetensors","b":"first.safetensors"}})";
  auto checkpoint = Checkpoint::Open(dir_, Quiet());
  ASSERT_FALSE(checkpoint.ok());
  EXPECT_THAT(std::string(checkpoint.status().message()),
              HasSubstr("tensor b is mapped to shard first.safetensors, but " + Path("first.safetensors") +
                        " has no tensor b"));

  std::ofstream(Path("model.safetensors.index.json")) << R"({"weight_map":{"a":"gone.safetensors"}})";
  EXPECT_THAT(std::string(Checkpoint::Open(dir_, Quiet()).status().message()),
              HasSubstr("shard gone.safetensors (holding tensor a) does not exist"));
}

TEST_F(SafetensorsTest, DuplicateTensorAcrossShardsWithoutIndexIsAnError) {
  SafetensorsWriter writer;
  writer.Add("w", RandomTensor(DType::kF32, {2}, 1));
  ASSERT_TRUE(writer.Write(Path("a.safetensors")).ok());
  writer.Add("w", RandomTensor(DType::kF32, {2}, 2));
  ASSERT_TRUE(writer.Write(Path("b.safetensors")).ok());
  auto checkpoint = Checkpoint::Open(dir_, Quiet());
  ASSERT_FALSE(checkpoint.ok());
  EXPECT_THAT(std::string(checkpoint.status().message()),
              HasSubstr("tensor w is in both " + Path("a.safetensors") + " and " + Path("b.safetensors")));
}

TEST_F(SafetensorsTest, CheckpointOpenErrors) {
  EXPECT_THAT(std::string(Checkpoint::Open(Path("absent"), Quiet()).status().message()),
              HasSubstr(Path("absent") + ": checkpoint directory does not exist"));
  WriteFile(Path("plain"), {1, 2, 3});
  EXPECT_THAT(std::string(Checkpoint::Open(Path("plain"), Quiet()).status().message()),
              HasSubstr(Path("plain") + ": not a directory"));
  EXPECT_THAT(std::string(Checkpoint::Open(dir_, Quiet()).status().message()),
              HasSubstr(dir_ + ": no .safetensors files"));
  std::ofstream(Path("model.safetensors.index.json")) << "{";
  EXPECT_THAT(std::string(Checkpoint::Open(dir_, Quiet()).status().message()),
              HasSubstr("model.safetensors.index.json: not valid JSON"));
}

TEST_F(SafetensorsTest, ShardedWriteAndReadThroughIndex) {
  std::vector<std::pair<std::string, Tensor>> tensors;
  for (int i = 0; i < 6; ++i) {
    tensors.emplace_back("layers." + std::to_string(i) + ".weight",
                         RandomTensor(DType::kBF16, {10, 50}, static_cast<uint32_t>(i)));  // 1000 bytes each
  }
  std::vector<Tensor> originals;
  for (const auto& [name, tensor] : tensors) originals.push_back(RandomTensor(tensor.dtype(), tensor.shape(), 0));
  for (size_t i = 0; i < tensors.size(); ++i) std::memcpy(originals[i].data(), tensors[i].second.data(), 1000);
  ASSERT_TRUE(WriteShardedCheckpoint(dir_, std::move(tensors), 2500).ok());

  std::ifstream index_file(Path("model.safetensors.index.json"));
  const nlohmann::json index = nlohmann::json::parse(index_file);
  EXPECT_EQ(index["metadata"]["total_size"], 6000);
  EXPECT_EQ(index["weight_map"]["layers.0.weight"], "model-00001-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.3.weight"], "model-00002-of-00003.safetensors");
  EXPECT_EQ(index["weight_map"]["layers.5.weight"], "model-00003-of-00003.safetensors");

  // A stray consolidated file and a tensor the index does not list are both ignored.
  SafetensorsWriter stray;
  stray.Add("layers.0.weight", RandomTensor(DType::kBF16, {10, 50}, 9));
  ASSERT_TRUE(stray.Write(Path("consolidated.safetensors")).ok());

  auto checkpoint = Checkpoint::Open(dir_, Quiet());
  ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
  EXPECT_EQ((*checkpoint)->FilePaths(), (std::vector<std::string>{Path("model-00001-of-00003.safetensors"),
                                                                  Path("model-00002-of-00003.safetensors"),
                                                                  Path("model-00003-of-00003.safetensors")}));
  EXPECT_EQ((*checkpoint)->TensorNames().size(), 6u);
  EXPECT_EQ((*checkpoint)->total_bytes(), 6000u);
  auto info = (*checkpoint)->Info("layers.4.weight");
  ASSERT_TRUE(info.ok());
  EXPECT_EQ(info->shape, (std::vector<int64_t>{10, 50}));
  for (int i = 5; i >= 0; --i) {
    auto tensor = (*checkpoint)->Load("layers." + std::to_string(i) + ".weight", DType::kBF16, {10, 50});
    ASSERT_TRUE(tensor.ok()) << tensor.status();
    EXPECT_EQ(std::memcmp(tensor->data(), originals[i].data(), 1000), 0) << i;
  }
  (*checkpoint)->Finish();

  // One tensor larger than the shard size gets a shard of its own.
  std::vector<std::pair<std::string, Tensor>> uneven;
  uneven.emplace_back("small", RandomTensor(DType::kU8, {10}, 1));
  uneven.emplace_back("big", RandomTensor(DType::kU8, {100}, 2));
  uneven.emplace_back("tail", RandomTensor(DType::kU8, {10}, 3));
  ASSERT_TRUE(WriteShardedCheckpoint(Path("uneven"), std::move(uneven), 50).ok());
  auto uneven_checkpoint = Checkpoint::Open(Path("uneven"), Quiet());
  ASSERT_TRUE(uneven_checkpoint.ok()) << uneven_checkpoint.status();
  EXPECT_EQ((*uneven_checkpoint)->FilePaths().size(), 3u);
  EXPECT_EQ((*uneven_checkpoint)->FilePaths()[1], Path("uneven") + "/model-00002-of-00003.safetensors");
}

TEST_F(SafetensorsTest, WriterReportsSizeMismatch) {
  SafetensorsWriter writer;
  writer.Add("w", DType::kBF16, {2, 2}, {1, 2, 3});
  const absl::Status status = writer.Write(Path("bad.safetensors"));
  EXPECT_THAT(
      std::string(status.message()),
      HasSubstr(Path("bad.safetensors") + ": tensor w: dtype BF16 x shape [2, 2] = 8 bytes but 3 bytes were given"));
  EXPECT_FALSE(fs::exists(Path("bad.safetensors")));
  writer.Add("w", DType::kU8, {3}, {1, 2, 3});  // the error does not stick to the next file
  EXPECT_TRUE(writer.Write(Path("good.safetensors")).ok());
}

TEST_F(SafetensorsTest, DropCacheLeavesNoResidentPages) {
  // Probe first: some filesystems (tmpfs, some overlays, ZFS) ignore DONTNEED.
  const std::string probe = Path("probe.bin");
  WriteFile(probe, RandomBytes(1 << 20, 7));
  SyncFile(probe);
  {
    const std::vector<uint8_t> warm = ReadFile(probe);
    const int fd = ::open(probe.c_str(), O_RDONLY);
    ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
  }
  size_t probe_pages = 0;
  if (ResidentPages(probe, &probe_pages) > probe_pages / 10) {
    GTEST_SKIP() << "the filesystem under " << dir_ << " ignores POSIX_FADV_DONTNEED";
  }

  std::vector<std::pair<std::string, Tensor>> tensors;
  for (int i = 0; i < 8; ++i) tensors.emplace_back("w" + std::to_string(i), RandomTensor(DType::kU8, {1 << 20}, i));
  ASSERT_TRUE(WriteShardedCheckpoint(dir_, std::move(tensors), 4u << 20).ok());
  std::vector<std::string> shards = {Path("model-00001-of-00002.safetensors"),
                                     Path("model-00002-of-00002.safetensors")};
  for (const std::string& shard : shards) SyncFile(shard);

  auto resident = [&] {
    size_t total = 0, pages = 0;
    for (const std::string& shard : shards) {
      size_t shard_pages = 0;
      total += ResidentPages(shard, &shard_pages);
      pages += shard_pages;
    }
    return std::make_pair(total, pages);
  };
  for (bool drop : {false, true}) {
    auto checkpoint = Checkpoint::Open(dir_, Quiet(drop));
    ASSERT_TRUE(checkpoint.ok()) << checkpoint.status();
    // w7 stays unread, so the second shard is released by Finish() rather than by Load().
    for (int i = 0; i < 7; ++i) {
      auto tensor = (*checkpoint)->Load("w" + std::to_string(i), DType::kU8, {1 << 20});
      ASSERT_TRUE(tensor.ok()) << tensor.status();
    }
    (*checkpoint)->Finish();
    const auto [pages_resident, pages] = resident();
    if (drop) {
      EXPECT_LE(pages_resident, pages / 100) << "of " << pages << " pages";
    } else {
      EXPECT_GE(pages_resident, pages / 2) << "loading without drop-cache should leave the file cached";
    }
  }
}

TEST_F(SafetensorsTest, RandomHeaderMutationsNeverCrash) {
  SafetensorsWriter writer;
  writer.Add("layers.0.attn.wq_a.weight", RandomTensor(DType::kF8E4M3, {8, 16}, 1));
  writer.Add("layers.0.attn.wq_a.scale", RandomTensor(DType::kF8E8M0, {1, 1}, 2));
  writer.Add("norm.weight", RandomTensor(DType::kBF16, {16}, 3));
  ASSERT_TRUE(writer.Write(Path("valid.safetensors"), {{"format", "pt"}}).ok());
  const std::vector<uint8_t> valid = ReadFile(Path("valid.safetensors"));
  uint64_t header_end = 8;
  for (int i = 7; i >= 0; --i) header_end += static_cast<uint64_t>(valid[i]) << (8 * i);

  const std::string interesting = "{}[]\",:-0123456789 eE.\xff\x80";
  std::mt19937 rng(1234);
  int accepted = 0;
  for (int round = 0; round < 2000; ++round) {
    std::vector<uint8_t> bytes = valid;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int e = 0; e < edits; ++e) {
      const size_t at = rng() % header_end;
      switch (rng() % 4) {
        case 0:
          bytes[at] = static_cast<uint8_t>(rng());
          break;
        case 1:
          bytes[at] = static_cast<uint8_t>(interesting[rng() % interesting.size()]);
          break;
        case 2:
          bytes.erase(bytes.begin() + static_cast<std::ptrdiff_t>(at));
          break;
        default:
          bytes.insert(bytes.begin() + static_cast<std::ptrdiff_t>(at), static_cast<uint8_t>(rng()));
          break;
      }
    }
    if (rng() % 10 == 0) bytes.resize(rng() % bytes.size());
    // A fresh inode each round: rewriting in place makes ext4 flush on every close.
    fs::remove(Path("mutated.safetensors"));
    WriteFile(Path("mutated.safetensors"), bytes);
    auto file = SafetensorsFile::Open(Path("mutated.safetensors"));
    if (!file.ok()) {
      EXPECT_THAT(std::string(file.status().message()), HasSubstr(Path("mutated.safetensors") + ": "));
      continue;
    }
    ++accepted;
    uint64_t covered = 0;
    for (const auto& [name, info] : (*file)->tensors()) {
      auto data = (*file)->Data(name);
      ASSERT_TRUE(data.ok());
      covered += data->size();
      volatile uint8_t sink = 0;
      for (uint8_t byte : *data) sink = sink + byte;  // touch every byte: must stay inside the mapping
    }
    EXPECT_LE(covered, (*file)->file_size());
  }
  EXPECT_LT(accepted, 2000);
}

}  // namespace
}  // namespace tandem::model
