// The plugin library's entry points: getCreators and setLoggerFinder, the pair TensorRT's
// IPluginRegistry::loadLibrary looks up (trtexec --dynamicPlugins, polygraphy --plugins,
// trt.get_plugin_registry().load_library). The library registers nothing by itself when loaded (no static
// registrars), since loadLibrary refuses creators that are already registered.
#include <NvInferVersion.h>

#include "plugin_base.h"

#if defined(_WIN32)
#define ATTN_EXPORT_API __declspec(dllexport)
#else
#define ATTN_EXPORT_API __attribute__((visibility("default")))
#endif

#define ATTN_EXPORT_STR2(x) #x
#define ATTN_EXPORT_STR(x) ATTN_EXPORT_STR2(x)

// The library's identity, readable from the file without loading it (engine manifests compare it): the op
// contracts' digest and the TensorRT headers it was compiled against.
extern "C" ATTN_EXPORT_API char const kAttnExportPluginsVersion[] =
    "attn_export_plugins:contracts=" ATTN_EXPORT_CONTRACTS_DIGEST ";tensorrt=" ATTN_EXPORT_STR(
        NV_TENSORRT_MAJOR) "." ATTN_EXPORT_STR(NV_TENSORRT_MINOR) "." ATTN_EXPORT_STR(NV_TENSORRT_PATCH);

extern "C" {

ATTN_EXPORT_API void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  attn_export::trt_plugins::setLoggerFinder(finder);
}

ATTN_EXPORT_API nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  using namespace attn_export::trt_plugins;
  // Function-local statics: built on first use, thread-safe, alive until the library is unloaded.
  static AttnPluginCreator<BlockSparseAttentionOp> blockSparseAttention;
  static AttnPluginCreator<DenseAttentionOp> denseAttention;
  static AttnPluginCreator<DisentangledAttentionOp> disentangledAttention;
  static AttnPluginCreator<KernelizedAttentionOp> kernelizedAttention;
  static AttnPluginCreator<LongConvolutionOp> longConvolution;
  static AttnPluginCreator<MixtureOfExpertsOp> mixtureOfExperts;
  static nvinfer1::IPluginCreatorInterface* const creators[] = {
      &blockSparseAttention, &denseAttention, &disentangledAttention,
      &kernelizedAttention,  &longConvolution, &mixtureOfExperts,
  };
  nbCreators = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}

// "attn_export_plugins:contracts=<digest>;tensorrt=<major.minor.patch>"
ATTN_EXPORT_API char const* attnExportPluginsVersion() { return kAttnExportPluginsVersion; }

}  // extern "C"
