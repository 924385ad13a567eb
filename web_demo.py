"""ChatGLM-6B in the browser: a chat page that streams each reply as it is generated.

    python web_demo.py [--model-path DIR] [--quantize 4|8] [--port 7860] [--host 127.0.0.1] [--share]
                       [--auth USER:PASSWORD]

then open the printed address. Enter sends, Shift+Enter starts a new line.
"""
import gradio as gr

import web_common as web


def messages(history):
    """Chatbot messages for the raw (query, reply) pairs: the user's text as typed, the reply's Markdown rendered,
    HTML in either shown as text (web_common.render_typed / render_reply)."""
    out = []
    for query, reply in history:
        out.append({"role": "user", "content": web.render_typed(query)})
        if reply:
            out.append({"role": "assistant", "content": web.render_reply(reply)})
    return out


def chat_view(value=None) -> gr.Chatbot:
    return gr.Chatbot(value, show_label=False, elem_id="chatbot", height=480, allow_tags=False,
                      feedback_options=None, buttons=["copy"])


def build_demo(service) -> gr.Blocks:
    with gr.Blocks(title="ChatGLM", analytics_enabled=False) as demo:
        gr.HTML('<h1 align="center">ChatGLM</h1>')
        web.add_notice(service.model)
        chatbot = chat_view()
        conversation = gr.State(web.Conversation())  # one per tab
        with gr.Row():
            with gr.Column(scale=4):
                query = gr.Textbox(show_label=False, placeholder="Input... (Enter sends, Shift+Enter: new line)",
                                   lines=1, max_lines=10, container=False, elem_id="query")
                with gr.Row():
                    submit = gr.Button("Submit", variant="primary", elem_id="submit")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=1):
                clear = gr.Button("Clear History", elem_id="clear")
                max_length, top_p, temperature = web.add_sliders()
                repetition_penalty, top_k, stop_strings = web.add_more_controls()

        web.connect(service, messages, sends=[submit.click, query.submit], query=query, conversation=conversation,
                    controls=[max_length, top_p, temperature, repetition_penalty, top_k, stop_strings], view=chatbot,
                    stop=stop, clears=[clear.click, chatbot.clear])  # Clear History and the chatbot's trash can
    return demo


def main(argv=None):
    web.serve(__doc__.splitlines()[0], build_demo, argv)


if __name__ == "__main__":
    main()
