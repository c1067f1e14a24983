# The exporter image. NVML comes from the host driver, mounted by the NVIDIA container
# runtime (NVIDIA_DRIVER_CAPABILITIES=utility), so the image carries no CUDA.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY exporter ./exporter
COPY gate ./gate
COPY gpu_residency_common ./gpu_residency_common
COPY fakenvml ./fakenvml
RUN pip install --no-cache-dir . && rm -rf /root/.cache
ENV NVIDIA_VISIBLE_DEVICES=all NVIDIA_DRIVER_CAPABILITIES=utility PYTHONUNBUFFERED=1
EXPOSE 9852
USER 0
ENTRYPOINT ["gpu-residency-exporter"]
