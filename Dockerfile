# CUDA serving image: the runtime install (`pip install .`) on a CUDA build of torch.
#   docker build -t lorasrv .
#   docker run --gpus all -p 30000:30000 -v ~/.cache/huggingface:/root/.cache/huggingface \
#     lorasrv --model-path meta-llama/Llama-3.1-8B-Instruct --lora-paths sql=/adapters/sql
# The CUDA libraries come inside torch's wheels; the host needs the NVIDIA driver and the
# NVIDIA container toolkit. Another CUDA: --build-arg TORCH_INDEX_URL=.../whl/cu126.
FROM python:3.11-slim

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_SPEC=torch==2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1

# torch first, in its own layer: the largest download, and it changes least often
RUN pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"

WORKDIR /opt/lorasrv
# what `pip install .` reads: the project file (its readme and license too) and both packages
COPY pyproject.toml README.md LICENSE ./
COPY lorasrv ./lorasrv
COPY kernels ./kernels
RUN pip install . && rm -rf build

EXPOSE 30000
# later flags win, so `docker run ... lorasrv --port 8000` still works
ENTRYPOINT ["lorasrv", "--host", "0.0.0.0", "--port", "30000"]
