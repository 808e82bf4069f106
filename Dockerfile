# gradwatch: API and workers share this image; the command picks the role.
FROM python:3.11-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /app
# torch first (the project's range admits 2.13), then the project itself. Pass
# --build-arg TORCH_INDEX_URL=<a CPU-only wheel index> for a smaller CPU-only image.
ARG TORCH_INDEX_URL=""
RUN pip install "torch==2.13.0" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY pyproject.toml README.md alembic.ini ./
COPY gradwatch ./gradwatch
COPY models ./models
COPY service ./service
COPY alembic ./alembic
RUN pip install -e .
RUN useradd --create-home gradwatch
USER gradwatch
EXPOSE 8000
CMD ["gradwatch", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
